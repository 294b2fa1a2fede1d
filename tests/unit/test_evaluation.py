"""Evaluation: NLL equals the model's own log-probs, every token scored once, bits-per-byte from UTF-8 bytes."""

import math

import polars as pl
import pytest
import torch
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from latent_atlas.evaluation import context_token, evaluate_corpus, score_documents, summarise_performance
from latent_atlas.testing import tiny_tokenizer
from tests.conftest import SENTENCES

LONG = " ".join(SENTENCES[:4])  # 37 tokens


def _hand_nll(loaded, ids):
    """Summed NLL of ``ids`` after the context token, from one unbatched forward of the model."""
    context, _ = context_token(loaded.tokenizer)
    sequence = torch.tensor([[context, *ids]])
    with torch.no_grad():
        logits = loaded.model(input_ids=sequence).logits[0, :-1]
    log_probs = torch.log_softmax(logits.float(), -1).gather(-1, sequence[0, 1:, None])[:, 0]
    return -float(log_probs.double().sum())


def _ids(loaded, text):
    return loaded.tokenizer(text, add_special_tokens=False)["input_ids"]


def _prefixing_tokenizer():
    """A tokenizer that puts ``<bos>`` in front itself, as Gemma's does."""
    tokenizer = tiny_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tokenizer.bos_token_id)]
    )
    return tokenizer


def test_nll_equals_the_models_own_log_probs_batched_or_not(tiny_loaded):
    texts = [SENTENCES[3], SENTENCES[0], SENTENCES[5], SENTENCES[2]]  # different lengths: padded rows
    batched = score_documents(tiny_loaded.model, tiny_loaded.tokenizer, texts)
    for text, row in zip(texts, batched.iter_rows(named=True), strict=True):
        ids = _ids(tiny_loaded, text)
        assert row["tokens"] == len(ids)
        assert row["nll"] == pytest.approx(_hand_nll(tiny_loaded, ids), rel=1e-5)
        alone = score_documents(tiny_loaded.model, tiny_loaded.tokenizer, [text])
        assert alone["nll"][0] == pytest.approx(row["nll"], rel=1e-5)
    assert batched.schema == {"tokens": pl.Int64, "bytes": pl.Int64, "nll": pl.Float64}


def test_long_text_is_windowed_and_every_token_scored_once(tiny_loaded):
    ids = _ids(tiny_loaded, LONG)
    scores = score_documents(tiny_loaded.model, tiny_loaded.tokenizer, [LONG, SENTENCES[3]], max_length=8)
    assert scores["tokens"].to_list() == [len(ids), len(_ids(tiny_loaded, SENTENCES[3]))]
    windows = [ids[start : start + 7] for start in range(0, len(ids), 7)]
    assert sum(len(w) for w in windows) == len(ids) and len(windows) == 6
    assert scores["nll"][0] == pytest.approx(sum(_hand_nll(tiny_loaded, w) for w in windows), rel=1e-5)
    whole = score_documents(tiny_loaded.model, tiny_loaded.tokenizer, [LONG], max_length=64)
    assert whole["nll"][0] == pytest.approx(_hand_nll(tiny_loaded, ids), rel=1e-5)


def test_bits_per_byte_counts_the_texts_utf8_bytes(tiny_loaded):
    text = "the café was by the river — at night ."
    assert len(text.encode("utf-8")) != len(text)
    ids = _ids(tiny_loaded, text)
    assert tiny_loaded.tokenizer.unk_token_id in ids  # unknown words still count, as the unknown token
    scores = score_documents(tiny_loaded.model, tiny_loaded.tokenizer, [text])
    assert scores["bytes"][0] == len(text.encode("utf-8")) == len(text) + 3
    assert scores["tokens"][0] == len(ids) != scores["bytes"][0]
    row = summarise_performance(scores, ["x"]).row(0, named=True)
    assert row["bits_per_byte"] == pytest.approx(scores["nll"][0] / (math.log(2) * scores["bytes"][0]), rel=1e-12)
    assert row["bits_per_token"] == pytest.approx(scores["nll"][0] / (math.log(2) * len(ids)), rel=1e-12)


def test_summary_sums_over_documents_before_taking_ratios():
    scores = pl.DataFrame({"tokens": [1, 9, 4], "bytes": [10, 30, 8], "nll": [5.0, 9.0, 2.0]})
    summary = summarise_performance(scores, ["b", "b", "a"])
    assert summary["register"].to_list() == ["all", "a", "b"]
    assert summary["documents"].to_list() == [3, 1, 2]
    b = summary.row(2, named=True)
    assert (b["tokens"], b["bytes"], b["nll"]) == (10, 40, 14.0)
    assert b["perplexity"] == pytest.approx(math.exp(1.4))  # not the mean of exp(5) and exp(1)
    assert b["bits_per_byte"] == pytest.approx(14.0 / (math.log(2) * 40))
    overall = summary.row(0, named=True)
    for column in ("documents", "tokens", "bytes", "nll"):
        assert overall[column] == pytest.approx(summary[column][1:].sum())
    assert overall["perplexity"] == pytest.approx(math.exp(16.0 / 14))
    with pytest.raises(ValueError, match="reserved"):
        summarise_performance(scores, ["all", "b", "a"])
    with pytest.raises(ValueError, match="2 labels for 3"):
        summarise_performance(scores, ["a", "b"])


def test_evaluate_corpus_per_register_and_split(tiny_loaded, tiny_corpus):
    table = evaluate_corpus(tiny_loaded, tiny_corpus, None, max_length=16)
    assert table.columns[:3] == ["model", "split", "register"]
    assert table["model"].unique().to_list() == [tiny_loaded.manifest["name"]]
    assert table["register"].to_list() == ["all", "a", "b"]
    overall, registers = table.row(0, named=True), table.slice(1)
    assert overall["documents"] == tiny_corpus.height
    assert overall["bytes"] == sum(len(t.encode()) for t in tiny_corpus["text"])
    assert overall["nll"] == pytest.approx(registers["nll"].sum(), rel=1e-12)
    assert overall["tokens"] == registers["tokens"].sum()
    assert table["perplexity"].to_list() == pytest.approx((table["nll"] / table["tokens"]).exp().to_list())
    scores = score_documents(tiny_loaded.model, tiny_loaded.tokenizer, tiny_corpus["text"].to_list(), 16)
    assert overall["nll"] == pytest.approx(scores["nll"].sum(), rel=1e-9)

    heldout = evaluate_corpus(tiny_loaded, tiny_corpus, "heldout", max_length=16)
    assert heldout["split"].unique().to_list() == ["heldout"]
    assert heldout["documents"][0] == tiny_corpus.filter(pl.col("split") == "heldout").height
    with pytest.raises(ValueError, match="heldout, train"):
        evaluate_corpus(tiny_loaded, tiny_corpus, "test", max_length=16)


def test_unlabelled_documents_count_under_none(tiny_loaded, tiny_corpus):
    corpus = tiny_corpus.with_columns(pl.lit(None, pl.String).alias("label"))
    table = evaluate_corpus(tiny_loaded, corpus, "train", max_length=16)
    assert table["register"].to_list() == ["all", "(none)"]


def test_context_token_rule(tiny_loaded):
    plain = tiny_tokenizer()
    assert plain("the dog")["input_ids"] == plain("the dog", add_special_tokens=False)["input_ids"]
    assert context_token(plain) == (plain.bos_token_id, "bos_token=<bos>")

    prefixing = _prefixing_tokenizer()
    assert prefixing("the dog")["input_ids"][0] == prefixing.bos_token_id
    assert context_token(prefixing) == (prefixing.bos_token_id, "tokenizer_prefix=<bos>")
    # the tokenizer's own <bos> is not added a second time, nor scored
    texts = SENTENCES[:3]
    with_prefix = score_documents(tiny_loaded.model, prefixing, texts)
    without = score_documents(tiny_loaded.model, plain, texts)
    assert with_prefix["tokens"].to_list() == without["tokens"].to_list()
    assert with_prefix["nll"].to_list() == pytest.approx(without["nll"].to_list(), rel=1e-6)

    eos_only = tiny_tokenizer()
    eos_only.bos_token = None
    assert context_token(eos_only) == (eos_only.eos_token_id, "eos_token=<eos>")

    neither = PreTrainedTokenizerFast(
        tokenizer_object=tiny_tokenizer().backend_tokenizer, unk_token="<unk>", pad_token="<pad>"
    )
    with pytest.raises(ValueError, match="no BOS/EOS token to condition the first token on"):
        context_token(neither)
    with pytest.raises(ValueError, match="no BOS/EOS token"):
        score_documents(tiny_loaded.model, neither, ["the dog"])


def test_one_window_per_batch_equals_one_large_batch(tiny_loaded):
    texts = [LONG, *SENTENCES]
    large = score_documents(tiny_loaded.model, tiny_loaded.tokenizer, texts, max_length=10)
    small = score_documents(tiny_loaded.model, tiny_loaded.tokenizer, texts, max_length=10, max_logit_elements=1)
    assert small["tokens"].to_list() == large["tokens"].to_list()
    assert small["nll"].to_list() == pytest.approx(large["nll"].to_list(), rel=1e-5)


def test_batches_respect_the_logit_budget():
    from latent_atlas.evaluation import _batches

    lengths = [3, 8, 5, 8, 2]
    assert _batches(lengths, 10, 1) == [[1], [3], [2], [0], [4]]
    assert _batches(lengths, 10, 160) == [[1, 3], [2, 0, 4]]
    for batch in _batches(lengths, 10, 200):
        assert len(batch) * max(lengths[i] for i in batch) * 10 <= 200


def test_empty_texts_and_too_short_windows_are_refused(tiny_loaded):
    with pytest.raises(ValueError, match="document 1 has no tokens"):
        score_documents(tiny_loaded.model, tiny_loaded.tokenizer, ["the dog", "  "])
    with pytest.raises(ValueError, match="at least 2"):
        score_documents(tiny_loaded.model, tiny_loaded.tokenizer, ["the dog"], max_length=1)
