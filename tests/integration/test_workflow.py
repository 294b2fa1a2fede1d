"""The real Snakemake DAG: lint, parse-time validation, a fast dry run, and the end-to-end run on SmolLM2."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def snakemake(*args: str, cwd: Path = REPO, timeout: int = 1800) -> subprocess.CompletedProcess:
    return subprocess.run([*SNAKEMAKE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def workdir(root: Path) -> Path:
    """A working directory that sees the repo's config/ and reuses its downloads in resources/."""
    (root / "config").symlink_to(REPO / "config")
    (root / "overlay.yaml").write_text(yaml.safe_dump({"paths": {"resources": str(REPO / "resources")}}))
    return root


def test_lint_is_clean():
    result = snakemake("--lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_dry_run_plans_the_whole_dag_without_importing_torch(tmp_path):
    root = workdir(tmp_path)
    args = ["--dry-run", "--snakefile", str(REPO / "workflow/Snakefile"), "--directory", str(root)]
    probe = (
        f"import sys\nfrom snakemake.cli import main\ntry:\n    main({args!r})\n"
        "except SystemExit as e:\n    code = e.code\nprint('EXIT', code, 'TORCH', 'torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert "EXIT 0 TORCH False" in result.stdout, result.stdout + result.stderr
    rules = ("acquire_model", "prepare_corpus", "extract_activations", "plot_store_norms", "explore_neighbourhood",
             "explore_path", "plot_neighbourhood", "plot_path", "steer_with_vectors", "steer_heads",
             "optimise_steering_vectors", "plot_steering", "measure_geometry", "check_readout_rescaling",
             "evaluate_performance", "relate_geometry", "plot_geometry", "plot_geometry_models", "compare_readers",
             "train_elm", "evaluate_elm", "plot_readers")  # fmt: skip
    for rule in rules:
        assert f"rule {rule}:" in result.stdout


@pytest.mark.parametrize(
    ("overlay", "message"),
    [
        ({"extraction": {"dtype": "float8"}}, "config key 'extraction.dtype': 'float8' is not one of"),
        ({"run": {"models": ["gpt-x"]}}, "'run.models' names 'gpt-x', which is not defined under 'models'"),
        ({"extraction": {"batchsize": 3}}, "'batchsize' was unexpected"),
    ],
)
def test_invalid_config_fails_at_parse_time(tmp_path, overlay, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(overlay))
    result = snakemake("--dry-run", "--configfile", "config/config.yaml", str(bad))
    assert result.returncode != 0
    assert message in result.stdout + result.stderr


@pytest.mark.e2e
@pytest.mark.slow
def test_default_dag_on_the_real_models(tmp_path_factory):
    root = workdir(tmp_path_factory.mktemp("e2e"))
    args = [
        "--snakefile",
        str(REPO / "workflow/Snakefile"),
        "--directory",
        str(root),
        "--configfile",
        "config/config.yaml",
        "config/ci.yaml",
        str(root / "overlay.yaml"),
    ]
    result = snakemake(*args, "--cores", "2")
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]

    model_dir = root / "results/models/smollm2-135m"
    store_path = root / "results/activations/smollm2-135m/registers.h5"
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert manifest["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert (manifest["n_layers"], manifest["d_model"], manifest["vocab_size"]) == (30, 576, 49152)
    assert manifest["tied_embeddings"] is True and "dequantised" in manifest["quantisation"]

    from latent_atlas.corpus import load_corpus_table
    from latent_atlas.models import load_model
    from latent_atlas.store import ActivationStore

    loaded = load_model(model_dir, device="cpu")
    prompt = loaded.tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        next_token = loaded.model(**prompt).logits[0, -1].argmax()
    assert loaded.tokenizer.decode(next_token) == " Paris"

    corpus, corpus_meta = load_corpus_table(root / "results/corpora/registers.parquet")
    assert corpus.height == 32
    expect = {"model_sha256": manifest["weights_sha256"], "corpus_sha256": corpus_meta["corpus_sha256"]}
    with ActivationStore(store_path, expect=expect) as store:
        attrs = store.attrs
        assert store.layers == [0, 10, 20, 30] and store.d_model == 576
        assert attrs["model"] == "smollm2-135m" and attrs["corpus"] == "registers" and attrs["config_hash"]
        assert attrs["code_version"].startswith("0.") and attrs["dtype"] == "float16"
        assert store.docs().height == 32
        doc_id = corpus["doc_id"][5]
        rows = store.doc_rows(doc_id)
        text = corpus.filter(corpus["doc_id"] == doc_id)["text"][0]
        encoded = loaded.tokenizer(text, return_tensors="pt", truncation=True, max_length=128)
        assert store.tokens()["token_id"][rows.start : rows.stop].to_list() == encoded["input_ids"][0].tolist()
        with torch.no_grad():
            out = loaded.model(**encoded, output_hidden_states=True)
        for layer in (0, 10, 20):
            reference = out.hidden_states[layer][0].numpy()
            stored = store.read(layer, rows)
            assert np.linalg.norm(stored - reference) / np.linalg.norm(reference) < 2e-3
        ln_final = torch.from_numpy(store.read("ln_final", rows))
        reference = out.hidden_states[30][0]
        assert torch.linalg.norm(ln_final - reference) / torch.linalg.norm(reference) < 2e-3
        with torch.no_grad():
            renormed = loaded.parts.final_norm(torch.from_numpy(store.read(30, rows)))
            logits = loaded.parts.lm_head(ln_final)
        assert torch.linalg.norm(renormed - reference) / torch.linalg.norm(reference) < 2e-3
        agreement = (logits.argmax(-1) == out.logits[0].argmax(-1)).float().mean()
        assert agreement > 0.95

    import polars as pl

    lenses = pl.read_parquet(root / "results/lenses/smollm2-135m/registers.parquet")
    assert set(lenses["lens"]) == {"logit", "tuned", "patchscope_identity", "semantic_basis",
                                   "inverse_embedding_transpose", "inverse_embedding_pinv"}  # fmt: skip
    assert sorted(set(lenses["layer"])) == [0, 10, 20, 30]
    last_kl = lenses.filter((pl.col("layer") == 30) & (pl.col("metric") == "kl_to_final"))
    assert dict(zip(last_kl["lens"], last_kl["value"], strict=True))["logit"] < 1e-3  # float16 store
    assert dict(zip(last_kl["lens"], last_kl["value"], strict=True))["patchscope_identity"] < 1e-3
    fitted = lenses.filter(pl.col("temperature").is_not_null())  # fitted on the training split
    assert set(fitted["lens"]) == {"semantic_basis", "inverse_embedding_transpose", "inverse_embedding_pinv"}
    probe = json.loads((root / "results/probes/smollm2-135m/eiffel-paris.json").read_text())
    assert probe["address"] == "resid.09" and probe["provenance"]["model_sha256"] == manifest["weights_sha256"]
    assert set(probe["patchscopes"]) == {"identity", "entity_description"}
    assert "logit" in probe["lenses"] and "tuned" not in probe["lenses"]  # ci.yaml trains resid.00/10/20/30 only
    assert "Paris" in probe["patchscopes"]["identity"]["generated"]
    assert set(pl.read_parquet(root / "results/projections/smollm2-135m/alignment.parquet")["layer"]) == {30}
    recall = pl.read_parquet(root / "results/projections/smollm2-135m/recall.parquet")
    assert set(recall["layer"]) == {30} and set(recall["target"]) == {"layer", "final"}
    assert recall["positions"][0] == 200 and recall["aligned"].is_between(0, 1).all()

    neighbourhood = root / "results/neighbourhood/smollm2-135m/registers"
    point = pl.read_parquet(neighbourhood / "eiffel-paris.parquet")
    assert set(point["layer"]) == {10} and set(point["decoder"]) == {"logit", "semantic_basis", "tuned", "model"}
    at_centre = point.filter(pl.col("kind") != "data", pl.col("radius") == 0)
    assert at_centre["top1_retained"].all() and (at_centre["kl_to_reference"] == 0).all()  # radius 0 is the centre
    eiffel = loaded.tokenizer("The Eiffel Tower is in the city of Paris", return_tensors="pt")
    with torch.no_grad():
        own_next = loaded.model(**eiffel).logits[0, -1].argmax()  # the model decoder at the centre is the model
    assert point.filter(pl.col("kind") == "centre", pl.col("decoder") == "model")["top1_id"].to_list() == [own_next]
    meta = json.loads(pl.read_parquet_metadata(neighbourhood / "eiffel-paris.parquet")["latent_atlas"])
    assert meta["model_sha256"] == manifest["weights_sha256"] and meta["config_hash"]
    neighbours = pl.read_parquet(neighbourhood / "eiffel-paris.neighbours.parquet")
    assert neighbours.height == 4 * 10 and neighbours["context"].str.contains("⟦").all()
    path = pl.read_parquet(neighbourhood / "cat-to-dog.parquet")
    assert (path.filter(pl.col("t") == 0)["kl_to_reference"] == 0).all()
    assert (path.filter(pl.col("t") == 1)["kl_to_end"] == 0).all()

    steering = root / "results/steering/smollm2-135m"
    actadd = pl.read_parquet(steering / "actadd.parquet")
    assert set(actadd["coefficient"]) == {0.0, 4.0} and set(actadd["layer"]) == {10}
    unsteered = actadd.filter(pl.col("coefficient") == 0)
    assert (unsteered["relative_norm"] == 0).all() and (unsteered["off_target_kl"] < 1e-6).all()
    assert actadd["sentiment"].is_between(-1, 1).all() and (actadd["perplexity"] > 1).all()
    iti = pl.read_parquet(steering / "iti.parquet")
    assert iti["test_truth_accuracy"].is_between(0, 1).all() and iti["test_items"][0] == 40
    probes = pl.read_parquet(steering / "iti.probes.parquet")
    assert probes.height == 30 * 9 and probes["selected"].sum() == 4
    assert set(probes["validation_statements"]) == {80} and set(probes["test_statements"]) == {80}
    assert abs(probes["shuffled_test_accuracy"].mean() - 0.5) < 0.1  # the shuffled-label control sits at chance
    optimised = pl.read_parquet(steering / "optimised.parquet")
    assert optimised.height == 2 and (optimised["steps"] <= 3).all()

    figures = ["activations/smollm2-135m.registers.norms", "lenses/smollm2-135m.registers.curves",
               "lenses/smollm2-135m.registers.agreement", "lenses/smollm2-135m.registers.grid",
               "neighbourhood/smollm2-135m.registers.eiffel-paris.stability",
               "neighbourhood/smollm2-135m.registers.eiffel-paris.map",
               "neighbourhood/smollm2-135m.registers.cat-to-dog.path",
               "steering/smollm2-135m.effect", "steering/smollm2-135m.frontier", "steering/smollm2-135m.iti",
               "steering/smollm2-135m.examples", "projections/smollm2-135m.recall"]  # fmt: skip
    for name in figures:
        for ext, magic in (("pdf", b"%PDF"), ("png", b"\x89PNG")):
            assert (root / f"results/figures/{name}.{ext}").read_bytes()[:4] == magic

    _check_geometry_and_performance(root, manifest)
    _check_training_family(root, manifest)
    _check_readers(root, manifest)

    report = snakemake(*args, "--report", str(root / "report.html"))
    assert report.returncode == 0, report.stderr[-3000:]
    docutils_messages = re.findall(r".*\((?:INFO|WARNING|ERROR|SEVERE)/\d\).*", report.stderr)
    assert not docutils_messages, docutils_messages  # a caption that docutils complains about renders broken
    html = (root / "report.html").read_text(errors="ignore")
    assert "system-message" not in html
    assert "attention sinks with very large norms" in html  # the figure's caption, rendered
    assert "smollm2-135m.registers.norms.png" in html
    assert "Mickus et al.'s confound" in html and "registers.performance.png" in html  # geometry captions
    assert "debian.performance.png" in html and "differ only in" in html  # the training family's figures
    assert "smollm2-135m.clustering.png" in html and "so the model does not grade itself" in html  # readers
    assert "smollm2-135m.registers.claims.png" in html and "A claim that fails is a result" in html  # claims
    assert "smollm2-135m.registers.html" in html and "one self-contained page" in html  # the atlas

    _check_claims(root)
    _check_reruns(args, root)


def _check_claims(root: Path) -> None:
    """Every area decided its claims on the real tables; verdicts follow the intervals; figures exist."""
    import polars as pl

    from latent_atlas.claims import verdict

    claims = pl.read_parquet(root / "results/claims/smollm2-135m.registers.parquet")
    assert set(claims["area"]) == {"lenses", "geometry", "steering", "readers", "training"}, claims["area"].unique()
    assert set(claims["verdict"]) <= {"holds", "fails", "inconclusive"} and (claims["n"] >= 0).all()
    for row in claims.iter_rows(named=True):
        assert row["verdict"] == verdict(row["ci_low"], row["ci_high"], row["threshold"], row["holds_when"]), row
    gemma = pl.read_parquet(root / "results/claims/gemma3-270m.registers.parquet")
    assert set(gemma["area"]) <= {"geometry", "training"}  # ci.yaml runs lenses, steering and readers on SmolLM2
    for ext, magic in (("pdf", b"%PDF"), ("png", b"\x89PNG")):
        assert (root / f"results/figures/claims/smollm2-135m.registers.claims.{ext}").read_bytes()[:4] == magic
        steered = root / f"results/figures/neighbourhood/smollm2-135m.registers.steered-states.{ext}"
        assert steered.read_bytes()[:4] == magic


def _planned_jobs(result: subprocess.CompletedProcess) -> dict[str, int]:
    """Rule -> job count from a dry run's job stats table (empty when nothing is to be done)."""
    table = result.stdout.split("Job stats:", 1)[-1] if "Job stats:" in result.stdout else ""
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.MULTILINE) if m[1] != "total"}


def _check_reruns(args: list[str], root: Path) -> None:
    """An up-to-date DAG plans nothing; a changed probe, corpus, model or ELM judge re-plans exactly its descendants."""
    begin = time.perf_counter()
    again = snakemake(*args, "--dry-run")
    seconds = time.perf_counter() - begin
    assert again.returncode == 0 and "Nothing to be done" in again.stdout, again.stdout[-3000:]
    print(f"up-to-date dry run: nothing to be done, {seconds:.1f} s", file=sys.stderr)
    changed = root / "changed-probe.yaml"
    changed.write_text(yaml.safe_dump({"probes": {"eiffel-paris": {"text": "The Eiffel Tower stands in Paris"}}}))
    plan = snakemake(*args, str(changed), "--dry-run")
    assert plan.returncode == 0, plan.stderr[-3000:]
    jobs = _planned_jobs(plan)
    reading_the_probe = {"read_probe", "explore_neighbourhood", "plot_neighbourhood", "all"}
    assert jobs and set(jobs) <= reading_the_probe, jobs  # ci.yaml's one probe is also its neighbourhood point
    assert jobs.get("read_probe") == 1 and jobs.get("explore_neighbourhood") == 1, jobs
    # a changed corpus invalidates every store built on it (two models, three members), not the models themselves
    corpus = root / "changed-corpus.yaml"
    corpus.write_text(yaml.safe_dump({"corpora": {"registers": {"max_docs_per_label": 3}}}))
    jobs = _planned_jobs(snakemake(*args, str(corpus), "--dry-run"))
    assert jobs.get("prepare_corpus") == 1 and jobs.get("extract_activations") == 5, jobs
    assert not {"acquire_model", "train_member"} & set(jobs), jobs
    assert jobs.get("project_parameters") == 1, jobs  # Dar et al.'s recall reads held-out text of the corpus
    # a changed model entry re-acquires that model and re-runs what descends from it, nothing of the other
    model = root / "changed-model.yaml"
    model.write_text(yaml.safe_dump({"models": {"smollm2-135m": {"description": "the same model, described anew"}}}))
    jobs = _planned_jobs(snakemake(*args, str(model), "--dry-run"))
    assert jobs.get("acquire_model") == 1 and jobs.get("extract_activations") == 2, jobs  # registers, sentiment
    assert jobs.get("compare_readers") == 2 and jobs.get("train_elm") == 1, jobs
    assert jobs.get("evaluate_performance") == 1 and "train_member" not in jobs, jobs
    # a setting only the ELM's evaluation reads re-runs the evaluation, not the training
    judge = root / "changed-judge.yaml"
    judge.write_text(yaml.safe_dump({"readers": {"elm": {"judge": None, "max_new_tokens": 4}}}))
    jobs = _planned_jobs(snakemake(*args, str(judge), "--dry-run"))
    assert set(jobs) == {"evaluate_elm", "plot_readers", "decide_claims", "all"}, jobs  # the ELM's claims read it
    # comparing one task fewer re-draws the figure and re-runs no comparison
    tasks = root / "changed-tasks.yaml"
    tasks.write_text(yaml.safe_dump({"readers": {"clustering": {"tasks": ["registers"]}}}))
    jobs = _planned_jobs(snakemake(*args, str(tasks), "--dry-run"))
    assert set(jobs) == {"plot_readers", "decide_claims", "all"}, jobs


def _check_readers(root: Path, smollm2: dict) -> None:
    """Both readers ran on SmolLM2: every method on one split per task, the ELM against its controls."""
    import polars as pl

    readers = root / "results/readers/smollm2-135m"
    clustering = {"clustering_all_bases", "clustering_gt_only"}
    state_readers = clustering | {"semantic_bases", "zero_shot", "knn_prompting", "linear_probe"}
    both = {(method, read) for method in state_readers for read in ("raw", "template")}
    for task, n_test in (("registers", 16), ("sentiment", 16)):
        table = pl.read_parquet(readers / f"clustering/{task}.parquet")
        assert table["split_hash"].n_unique() == 1 and set(table["n_test"]) == {n_test}, table
        methods = set(zip(table["method"], table["input"], strict=True))
        assert methods == both | {("in_context", "template"), ("lora", "template")}, methods
        seeded = table.filter(pl.col("method").is_in(clustering | {"in_context", "lora"}))
        assert seeded["seed"].value_counts()["count"].to_list() == [6, 6]  # two inputs x two variants, ICL, LoRA
        assert table["balanced_accuracy"].is_between(0, 1).all()
    losses = pl.read_parquet(readers / "elm/losses.parquet")
    assert losses["step"].to_list() == [0, 1, 2, 3, 4] and losses["heldout_loss"].is_not_null().sum() == 3
    scores = pl.read_parquet(readers / "elm/evaluation.parquet")
    assert scores["condition"].value_counts(sort=True)["count"].to_list() == [16, 16, 16]
    shuffled = scores.filter(pl.col("condition") == "shuffled")
    assert (shuffled["embedding_of"] != shuffled["doc_id"]).all()
    assert scores["consistency"].is_not_null().all()  # judged by Gemma 3, not by SmolLM2 itself
    meta = json.loads(pl.read_parquet_metadata(readers / "elm/evaluation.parquet")["latent_atlas"])
    assert meta["judge"] == "gemma3-270m" and meta["model_sha256"] == smollm2["weights_sha256"]
    paths = pl.read_parquet(readers / "elm/paths.parquet")
    assert paths["kind"].value_counts(sort=True)["count"].to_list() == [5, 5]
    for figure in ("clustering", "elm", "descriptions", "paths"):
        for ext, magic in (("pdf", b"%PDF"), ("png", b"\x89PNG")):
            assert (root / f"results/figures/readers/smollm2-135m.{figure}.{ext}").read_bytes()[:4] == magic


def _check_geometry_and_performance(root: Path, smollm2: dict) -> None:
    """Gemma 3 acquired and stored without overflow; geometry, readout and performance for both models."""
    import polars as pl

    from latent_atlas.store import ActivationStore

    gemma = json.loads((root / "results/models/gemma3-270m/manifest.json").read_text())
    assert gemma["sha256"] == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert (gemma["n_layers"], gemma["d_model"], gemma["vocab_size"]) == (18, 640, 262144)
    with ActivationStore(root / "results/activations/gemma3-270m/registers.h5") as store:
        assert store.layers == [0, 10, 18] and store.attrs["dtype"] == "float32"  # its stream exceeds float16
        assert np.isfinite(store.read(18)).all()

    registers = {"all", "narrative", "informational_description", "opinion", "interactive_discussion", "how_to",
                 "informational_persuasion", "lyrical", "spoken"}  # fmt: skip
    for name, manifest, layers in (("smollm2-135m", smollm2, {0, 10, 20, 30}), ("gemma3-270m", gemma, {0, 10, 18})):
        performance = pl.read_parquet(root / f"results/evaluation/{name}/registers.parquet")
        assert set(performance["register"]) == registers
        overall = performance.filter(pl.col("register") == "all")
        parts = performance.filter(pl.col("register") != "all")
        assert overall["nll"][0] == pytest.approx(parts["nll"].sum()) and overall["documents"][0] == 16
        assert 0.3 < overall["bits_per_byte"][0] < 3 and overall["perplexity"][0] > 1
        meta = json.loads(
            pl.read_parquet_metadata(root / f"results/evaluation/{name}/registers.parquet")["latent_atlas"]
        )
        assert meta["model_sha256"] == manifest["weights_sha256"]
        geometry = pl.read_parquet(root / f"results/geometry/{name}/registers.parquet")
        assert set(geometry["layer"]) == layers and set(geometry["register"]) == registers
        assert set(geometry["processing"]) == {"none", "centre", "standardise", "whiten", "all_but_the_top", "flow"}
        assert geometry["value"].is_finite().all()
        readout = pl.read_parquet(root / f"results/geometry/{name}/readout.parquet")
        changes = dict(zip(readout["quantity"], readout["value"], strict=True))
        assert changes["max_abs_logit_change"] < 1e-9 and changes["scalar_rescaling_cosine_change"] < 1e-12
    assert meta["context_token"] == "tokenizer_prefix=<bos>"  # Gemma's tokenizer adds its own <bos>

    relations = pl.read_parquet(root / "results/geometry/registers.relations.parquet")
    pooled = relations.filter(pl.col("level") == "registers", pl.col("measure") == "bits_per_byte")
    assert set(pooled["n"]) == {16} and set(pooled["n_models"]) == {2}  # 2 models x 8 registers, said so
    assert relations.filter(pl.col("level") == "models")["spearman"].is_nan().all()  # two models: no correlation
    for name in ("smollm2-135m.registers.processing", "gemma3-270m.registers.rogue",
                 "gemma3-270m.registers.registers", "registers.models", "registers.performance"):  # fmt: skip
        for ext, magic in (("pdf", b"%PDF"), ("png", b"\x89PNG")):
            assert (root / f"results/figures/geometry/{name}.{ext}").read_bytes()[:4] == magic


CI_MEMBERS = ["debian-narrative", "debian-how_to", "debian-uniform"]


def _check_training_family(root: Path, smollm2: dict) -> None:
    """ci.yaml's family: members saved like acquired models, scored, measured at every layer, plotted."""
    import polars as pl

    manifests = {m: json.loads((root / f"results/models/{m}/manifest.json").read_text()) for m in CI_MEMBERS}
    records = {m: manifest["training"] for m, manifest in manifests.items()}
    assert {m: r["mixture"] for m, r in records.items()} == {
        "debian-narrative": {"narrative": 1.0},
        "debian-how_to": {"how_to": 1.0},
        "debian-uniform": {"how_to": 0.5, "narrative": 0.5},
    }
    assert len({r["recipe_hash"] for r in records.values()}) == 1  # one recipe: only the data differ
    assert len({r["data_hash"] for r in records.values()}) == 3
    assert all(r["tokens_seen"] == 20480 and r["seed"] == 0 for r in records.values())
    assert all(m["n_layers"] == 2 and m["d_model"] == 32 and m["source"] == "trained" for m in manifests.values())
    corpus = json.loads((root / "results/training/debian/corpus.json").read_text())
    assert {"kjv-narrative", "manpages"} <= set(corpus["sources"]) and corpus["corpus_sha256"]

    family = root / "results/training/debian"
    matrix = pl.read_parquet(family / "performance.parquet")
    assert set(matrix["model"]) == {*CI_MEMBERS, "smollm2-135m"}
    assert set(matrix["register"]) == {"all", "narrative", "how_to"}
    assert (matrix.filter(pl.col("register") != "all")["documents"] == 2).all()
    smol = matrix.filter(pl.col("model") == "smollm2-135m", pl.col("register") == "all")
    member = matrix.filter(pl.col("model") == "debian-uniform", pl.col("register") == "all")
    assert smol["bytes"].item() == member["bytes"].item()  # the same raw text, whatever the tokenizer
    assert smol["bits_per_byte"].item() < member["bits_per_byte"].item()  # 135M pretrained beats 20k tokens
    geometry = pl.read_parquet(family / "geometry.parquet")
    member_layers = geometry.filter(pl.col("model") == "debian-narrative")["layer"].unique().sort().to_list()
    assert member_layers == [0, 1, 2] and set(geometry["kind"]) == {"member", "pretrained"}
    lenses = pl.read_parquet(family / "lenses.parquet")
    assert set(lenses["model"]) == {*CI_MEMBERS, "smollm2-135m"}
    final = lenses.filter(pl.col("model") == "debian-uniform", pl.col("lens") == "logit", pl.col("layer") == 2)
    assert final.filter(pl.col("metric") == "kl_to_final")["value"].item() < 1e-4  # float32 member store
    losses = pl.read_parquet(family / "losses.parquet")
    assert losses.group_by("model").len()["len"].to_list() == [40, 40, 40]
    assert pl.read_parquet(family / "specialisation.parquet")["register"].to_list() == ["how_to", "narrative"]
    for figure in ("performance", "curves", "geometry", "lenses", "relations"):
        for ext, magic in (("pdf", b"%PDF"), ("png", b"\x89PNG")):
            assert (root / f"results/figures/training/debian.{figure}.{ext}").read_bytes()[:4] == magic


DEFAULT_MEMBERS = ["debian-narrative", "debian-informational_description", "debian-how_to", "debian-uniform"]


@pytest.mark.e2e
@pytest.mark.slow
def test_the_default_family_specialises(tmp_path_factory):
    """config.yaml's family: each single-register member beats every member that never saw its register.

    Runs the real DAG up to each member's scores on the test split (corpus, tokenizer, four members).
    """
    import polars as pl

    from latent_atlas.training.evaluate import performance_matrix, specialisation

    root = workdir(tmp_path_factory.mktemp("family"))
    tables = [f"results/training/debian/performance/{member}.parquet" for member in DEFAULT_MEMBERS]
    args = ["--snakefile", str(REPO / "workflow/Snakefile"), "--directory", str(root)]
    result = snakemake(*args, "--configfile", "config/config.yaml", str(root / "overlay.yaml"), "--cores", "2", *tables)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    mixtures = {m: json.loads((root / f"results/models/{m}/manifest.json").read_text())["training"]["mixture"]
                for m in DEFAULT_MEMBERS}  # fmt: skip
    matrix = performance_matrix([pl.read_parquet(root / table) for table in tables], mixtures)
    checks = specialisation(matrix, mixtures)
    assert checks["register"].to_list() == ["how_to", "informational_description", "narrative"]
    assert checks["holds"].all(), checks
