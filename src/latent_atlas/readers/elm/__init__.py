"""ELM, an embedding language model (Tennenholtz et al., ICLR 2024; METHODS §6): the LM talks about a vector.

A domain embedding ``w ∈ R^{d_w}`` (here computed from the LM's own hidden states) is mapped by a small MLP
adapter to ``n_soft`` soft tokens in the LM's input-embedding space; they replace the placeholder
:data:`EMBEDDING_PLACEHOLDER` of a prompt, and the LM is trained to continue the prompt with a target text
(next-token cross-entropy on the target tokens only).

- Norms: every soft token is rescaled to a fixed ``target_norm``, by default the median norm of the embedding
  module's *output* over the vocabulary (so Gemma's ``sqrt(d)`` scale, applied inside its embedding module,
  is included; METHODS §0.4). Soft tokens far off the token-norm range are the main way an ELM fails.
- Stage 1 trains the adapter only: the LM's parameters are frozen (no gradients, no optimiser state, eval
  mode), so its outputs on any text without a soft token are bit-identical before and after training.
  Stage 2 also fine-tunes the LM; it changes the base model, so that check no longer holds.
- Conditions for evaluation: ``true`` (each example's own embedding), ``shuffled`` (a seeded derangement of
  the examples' embeddings: no example keeps its own) and ``none`` (the placeholder removed, no soft token).
- A judge for semantic consistency: mean-pooled hidden states of another model (:func:`mean_pooled_states`),
  compared by cosine (:func:`semantic_consistency`).

Sequences are ``[BOS] prompt-before · soft tokens · prompt-after · target · EOS``: each piece is tokenised on
its own, without special tokens; the BOS is added only where the tokenizer adds one to plain text.

The package: :mod:`.adapter` (norms, the adapter, saving and loading), :mod:`.batching` (examples, tokenising,
batches with soft-token slots), :mod:`.train` (training and the losses under each condition) and
:mod:`.generation` (generation and the judge). The names below are its public face.
"""

from latent_atlas.readers.elm.adapter import (
    EmbeddingAdapter,
    EmbeddingNorms,
    embedding_norms,
    load_adapter,
    model_fingerprint,
    read_adapter_record,
    save_adapter,
    typical_embedding_norm,
)
from latent_atlas.readers.elm.batching import (
    CONDITIONS,
    EMBEDDING_PLACEHOLDER,
    IGNORE_INDEX,
    ElmBatch,
    ElmExample,
    EncodedExample,
    adds_bos,
    build_batch,
    condition_rows,
    embed_rows,
    encode_example,
    encode_examples,
    example_nll,
    head_logits,
    leading_tokens,
    make_examples,
    shuffled_rows,
    soft_tokens,
)
from latent_atlas.readers.elm.generation import (
    PromptInputs,
    generate,
    mean_pooled_states,
    prompt_inputs,
    semantic_consistency,
)
from latent_atlas.readers.elm.train import (
    LOSS_SCHEMA,
    adapter_optimiser,
    example_order,
    lm_trainable,
    target_losses,
    train_adapter,
    training_step,
)

__all__ = [
    "CONDITIONS",
    "EMBEDDING_PLACEHOLDER",
    "IGNORE_INDEX",
    "LOSS_SCHEMA",
    "ElmBatch",
    "ElmExample",
    "EmbeddingAdapter",
    "EmbeddingNorms",
    "EncodedExample",
    "PromptInputs",
    "adapter_optimiser",
    "adds_bos",
    "build_batch",
    "condition_rows",
    "embed_rows",
    "embedding_norms",
    "encode_example",
    "encode_examples",
    "example_nll",
    "example_order",
    "generate",
    "head_logits",
    "leading_tokens",
    "lm_trainable",
    "load_adapter",
    "make_examples",
    "mean_pooled_states",
    "model_fingerprint",
    "prompt_inputs",
    "read_adapter_record",
    "save_adapter",
    "semantic_consistency",
    "shuffled_rows",
    "soft_tokens",
    "target_losses",
    "train_adapter",
    "training_step",
    "typical_embedding_norm",
]
