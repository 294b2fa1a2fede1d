"""A LoRA baseline for semantic clustering: the model itself adapted to a task (Hu et al. 2022, via ``peft``).

Gu et al. (METHODS §4) compare semantic clustering with parameter-efficient fine-tuning. Here low-rank
adapters (rank r, scale alpha / r) are injected into the configured linear modules of the frozen model and
trained on the task's training texts, each rendered by the task's template up to its label slot (the query
zero-shot prompting reads, :func:`~latent_atlas.readers.baselines.query_token_ids`), by cross-entropy over
the label words' first tokens at the template's answer position: the logits of the class words only, so
the adapters learn to choose among the label words as zero-shot prompting does. Prediction is the argmax of
the same logits. The adapters are removed afterwards (``unload``): the model's weights, parameter flags and
mode are as before, its logits bit-identical.

With no training steps the adapters are exactly zero (``lora_B`` starts at zero), so the prediction is the
zero-shot reading of the template.
"""

import contextlib
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from latent_atlas.errors import ConfigError
from latent_atlas.models import LoadedModel


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA baseline's settings (config ``readers.lora``).

    Attributes:
        rank: r of each adapter ``B A`` (A: r x d_in, B: d_out x r).
        alpha: the adapter's output is scaled by alpha / r.
        target_modules: names of the linear modules adapted (``q_proj``, ``v_proj``: the LoRA paper's W_q, W_v).
        dropout: dropout on the adapters' input during training.
        lr: AdamW learning rate of the adapters.
        weight_decay: AdamW weight decay.
        steps: optimiser steps; ``None`` gives clustering's budget in examples (its epochs x the training
            texts, in batches of ``batch_size``).
        batch_size: training texts per step.
    """

    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    dropout: float = 0.0
    lr: float = 1e-3
    weight_decay: float = 0.0
    steps: int | None = None
    batch_size: int = 8

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> "LoraSettings":
        """The settings of ``readers.lora`` (its ``enabled`` and ``seeds`` keys are the pipeline's)."""
        keys = {key: value for key, value in section.items() if key not in ("enabled", "seeds")}
        if "target_modules" in keys:
            keys["target_modules"] = tuple(keys["target_modules"])
        return cls(**keys)

    def budget_steps(self, n_train: int, clustering_epochs: int) -> int:
        """``steps``, or clustering's budget in examples (epochs x ``n_train``) in batches of ``batch_size``."""
        if self.steps is not None:
            return self.steps
        return math.ceil(clustering_epochs * n_train / self.batch_size)


@contextlib.contextmanager
def lora_adapters(model: nn.Module, settings: LoraSettings, seed: int) -> Iterator[nn.Module]:
    """Inject fresh LoRA adapters into ``model`` (in place) for the body of the block; remove them on exit.

    The adapters' A matrices are drawn under ``seed`` (the global RNG is left untouched); only the adapters
    are trainable inside the block. On exit ``unload`` puts the original modules back, and every parameter's
    ``requires_grad`` and the model's train/eval mode are restored.

    Yields:
        The :class:`peft.PeftModel` wrapping ``model``.

    Raises:
        ConfigError: a target module is not in the model.
    """
    from peft import LoraConfig, get_peft_model

    flags = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    mode = model.training
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(seed)
        try:
            wrapped = get_peft_model(model, config)
        except ValueError as error:
            raise ConfigError(
                f"readers.lora.target_modules {list(settings.target_modules)} do not match this model's linear "
                f"modules ({error}); name modules it has, e.g. q_proj and v_proj for Llama-style attention"
            ) from error
    try:
        yield wrapped
    finally:
        wrapped.base_model.unload()
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(flags[name])
        model.train(mode)


def label_logits(
    loaded: LoadedModel, queries: Sequence[Sequence[int]], label_ids: Sequence[int], pad_id: int
) -> torch.Tensor:
    """The label words' logits at each query's last token, ``(n, n_classes)`` (differentiable).

    Queries are right-padded into one batch with an attention mask; the body's output (post final norm)
    at each query's last real token goes through the label words' rows of the LM head (and its bias), then
    the model's own post-head transform, so they equal the model's logits of those words.
    """
    device = loaded.device
    lengths = torch.tensor([len(query) for query in queries], device=device)
    if int(lengths.min()) == 0:
        raise ValueError("a query encodes to no tokens; the template must put text before {label}")
    width = int(lengths.max())
    ids = torch.tensor([list(query) + [pad_id] * (width - len(query)) for query in queries], device=device)
    mask = (torch.arange(width, device=device)[None] < lengths[:, None]).long()
    hidden = loaded.parts.body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    last = hidden[torch.arange(len(queries), device=device), lengths - 1]
    rows = torch.as_tensor(list(label_ids), dtype=torch.long, device=device)
    head = loaded.parts.lm_head
    logits = last @ head.weight[rows].T.to(last.dtype)
    bias = getattr(head, "bias", None)
    logits = logits if bias is None else logits + bias[rows].to(last.dtype)
    transform = getattr(head, "transform", None)  # the model's post-head scale / soft-cap, elementwise
    return (logits if transform is None else transform(logits)).float()


def train_and_predict(
    loaded: LoadedModel,
    train_queries: Sequence[Sequence[int]],
    train_y: torch.Tensor,
    test_queries: Sequence[Sequence[int]],
    label_ids: Sequence[int],
    settings: LoraSettings,
    steps: int,
    seed: int,
    eval_batch_size: int = 16,
) -> tuple[torch.Tensor, list[float]]:
    """Fine-tune fresh adapters on the training queries, predict the test queries, remove the adapters.

    Each step takes the next ``settings.batch_size`` texts of a stream of seeded permutations of the
    training texts (epochs without replacement) and minimises the cross-entropy of their classes over the
    label words' logits (:func:`label_logits`) by AdamW.

    Args:
        loaded: the model (left unchanged).
        train_queries: token ids of each training text's templated query, up to the label slot.
        train_y: their classes ``(n_train,)``, indices into ``label_ids``.
        test_queries: the test texts' queries.
        label_ids: the first token of each class's label word, in class order.
        settings: rank, alpha, modules, optimiser.
        steps: optimiser steps (0: the zero-shot reading).
        seed: the adapters' initialisation and the batch order.
        eval_batch_size: test queries per forward pass.

    Returns:
        Predicted classes of the test queries ``(n_test,)`` and the training loss of every step.
    """
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    order = _example_stream(len(train_queries), steps * settings.batch_size, seed)
    targets = torch.as_tensor(train_y, dtype=torch.long, device=loaded.device)
    losses = []
    with lora_adapters(loaded.model, settings, seed) as wrapped:
        trainable = [parameter for parameter in wrapped.parameters() if parameter.requires_grad]
        optimiser = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
        wrapped.train()
        for batch in order.split(settings.batch_size) if order.numel() else ():
            rows = batch.tolist()
            logits = label_logits(loaded, [train_queries[i] for i in rows], label_ids, pad)
            loss = functional.cross_entropy(logits, targets[batch.to(loaded.device)])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
        wrapped.eval()
        with torch.no_grad():
            scores = [
                label_logits(loaded, test_queries[i : i + eval_batch_size], label_ids, pad)
                for i in range(0, len(test_queries), eval_batch_size)
            ]
    return torch.cat(scores).argmax(dim=1).cpu(), losses


def _example_stream(n: int, length: int, seed: int) -> torch.Tensor:
    """The first ``length`` indices of consecutive seeded permutations of ``0..n-1``."""
    generator = torch.Generator().manual_seed(seed)
    epochs = math.ceil(length / n) if n else 0
    stream = [torch.randperm(n, generator=generator) for _ in range(epochs)]
    return torch.cat(stream)[:length] if stream else torch.zeros(0, dtype=torch.long)
