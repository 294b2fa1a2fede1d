"""Names that several layers repeat: steering methods, figure families, reader tasks.

Torch-free and import-light: ``rules/common.smk`` imports it at parse time, as do the scripts, the plots
and the analyses, so a name is spelled once. Layer labels are not here: they go through
:func:`latent_atlas.addresses.resid_address`.
"""

# ---- steering (rules/steering.smk) -------------------------------------------------------------------
GENERATION_METHODS = ("actadd", "mean_difference", "icv")  # the methods that steer generated text
STEERING_METHODS = (*GENERATION_METHODS, "iti", "optimised")  # every method, in the order figures draw them

# ---- learned readers (rules/readers.smk) ------------------------------------------------------------
ELM_TASKS = ("reconstruction", "register")  # what the ELM adapter is trained to say of a passage's point

# ---- figure families: the figures of each plotting rule, results/figures/{family}/… --------------------
FIGURE_FORMATS = ("pdf", "png")
LENS_FIGURES = ("curves", "agreement", "grid")
NEIGHBOURHOOD_POINT_FIGURES = ("stability", "map")
GEOMETRY_MODEL_FIGURES = ("processing", "rogue", "registers")
GEOMETRY_CORPUS_FIGURES = ("models", "performance")
TRAINING_FIGURES = ("performance", "curves", "geometry", "lenses", "relations")
GENERATION_FIGURES = ("effect", "frontier")  # drawn when a generation method runs
STEERING_FIGURES = ("examples", *GENERATION_FIGURES, "iti")  # examples always; iti when ITI runs
ELM_FIGURES = ("elm", "descriptions", "paths")  # drawn when the ELM is trained
READER_FIGURES = ("clustering", *ELM_FIGURES)  # clustering when a task is compared
