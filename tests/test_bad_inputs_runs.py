"""The bad-input matrix, second part: inputs whose refusal (or support) shows only once something runs: a model
forward, a resumed training run, a corpus read, a file written. Each case asserts the first line of its message."""

import dataclasses
import os
import stat

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import CONTEXT, make_pipeline

from fastkvzip_press import FastKVzipPress, FastKVzipScorerPress, GateBank, ModelLayout, save_gates
from fastkvzip_press.cli import main
from fastkvzip_press.evaluation import make_ruler_samples
from fastkvzip_press.models import tiny_tokenizer
from fastkvzip_press.training import FitConfig, TrainConfig, iter_documents, train
from fastkvzip_press.training.workflow import extraction_arguments

FIT = FitConfig(steps=4, batch_tokens=100, rank=4, n_sink=4, eval_every=2, checkpoint_every=100, warmup_steps=1)


def first_line(error: BaseException) -> str:
    return str(error).splitlines()[0]


# ------------------------------------------------------------------------------------------------------ training


def test_resume_refuses_a_changed_context_length_naming_it(llama, corpus_dir, tmp_path):
    model, tokenizer = llama
    first = TrainConfig(corpus=str(corpus_dir), context_len=256, max_tokens=None, val_fraction=0.25, fit=FIT)
    train(model, tokenizer, tmp_path / "run", first, progress=False)
    changed = dataclasses.replace(first, context_len=512)
    with pytest.raises(ValueError) as error:
        train(model, tokenizer, tmp_path / "run", changed, progress=False)
    assert "was extracted with --context-len 256; this run asks for --context-len 512" in first_line(error.value)


@pytest.mark.parametrize(
    ("change", "flag"),
    [
        ({"corpus": "other"}, "--corpus"),
        ({"text_column": "body"}, "--text-column"),
        ({"dtype": "bfloat16"}, "the model's dtype"),
    ],
)
def test_resume_refuses_every_changed_extraction_argument(llama, corpus_dir, tmp_path, change, flag):
    """Shards record what decided them; the same check covers corpus, text column and dtype."""
    from fastkvzip_press.training.features import check_extraction

    model, _ = llama
    config = TrainConfig(corpus=str(corpus_dir), context_len=256, fit=FIT)
    written = extraction_arguments(config, model)
    with pytest.raises(ValueError, match=f"was extracted with {flag}"):
        check_extraction(tmp_path / "shard", {"extraction": written}, {**written, **change})


def test_a_parquet_corpus_without_the_text_column_names_its_columns(tmp_path):
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"content": ["first document " * 50, "second document " * 50]}), path)
    with pytest.raises(ValueError) as error:
        list(iter_documents(path))
    assert first_line(error.value) == (
        f"corpus file {path} has no column 'text'; its columns are ['content']. Choose the text column with "
        "--text-column NAME (text_column= in TrainConfig)"
    )
    assert len(list(iter_documents(path, text_column="content"))) == 2


def test_an_unreachable_hub_corpus_is_an_error_line(monkeypatch, capsys, llama, tmp_path):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'no/such-dataset' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match=r"corpus hf:no/such-dataset could not be read \(ConnectionError"):
        list(iter_documents("hf:no/such-dataset"))
    model, tokenizer = llama
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    capsys.readouterr()
    argv = ["-q", "train", "--model", str(folder), "--corpus", "hf:no/such-dataset", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: corpus hf:no/such-dataset could not be read") and "Traceback" not in err


def test_train_out_naming_a_file_is_an_error_line(tmp_path, capsys):
    file = tmp_path / "report.txt"
    file.write_text("x")
    assert main(["-q", "train", "--out", str(file)]) == 2
    assert capsys.readouterr().err.splitlines()[0] == f"error: --out {file} is a file; give a folder for the run's " + (
        "features, gates and report"
    )


def test_written_files_get_the_umask_permissions(llama, tmp_path):
    model, _ = llama
    previous = os.umask(0o022)
    try:
        paths = save_gates(GateBank.random(ModelLayout.from_model(model)), tmp_path / "gates")
    finally:
        os.umask(previous)
    for path in paths.values():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


# -------------------------------------------------------------------------------------------------------- presses


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_padded_batch_with_an_empty_prompt_keeps_what_it_has(llama, random_gates, side):
    """The scorer alone in kvpress's way: a sequence with nothing to evict keeps its (no) pairs."""
    model, tokenizer = llama
    tokenizer.padding_side = side
    batch = tokenizer([CONTEXT, ""], return_tensors="pt", padding=True)
    tokenizer.padding_side = "left"
    press = FastKVzipScorerPress(0.5, gates=random_gates(model))
    with torch.no_grad(), press(model):
        out = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (2, batch["input_ids"].shape[1] + 3)


def test_ratio_zero_reports_stats_of_a_run_that_evicts_nothing(llama, random_gates):
    model, tokenizer = llama
    press = FastKVzipPress(0.0, gates=random_gates(model))
    pipe = make_pipeline(model, tokenizer)
    pipe(CONTEXT, question="what ?", press=press, max_new_tokens=2)
    assert press.last_stats is not None
    assert press.last_stats.compression_ratio == 0.0
    stats = press.last_stats
    assert all(kept.unique().tolist() == [stats.context_length] for kept in stats.kept_per_head.values())


def test_a_threshold_press_keeps_its_fields_after_a_run(llama, random_gates):
    model, tokenizer = llama
    press = FastKVzipPress(threshold=0.5, gates=random_gates(model))
    make_pipeline(model, tokenizer)(CONTEXT, question="what ?", press=press, max_new_tokens=2)
    assert press.compression_ratio == 0.0 and press.threshold == 0.5
    assert 0 < press.last_stats.compression_ratio < 1
    again = dataclasses.replace(press, window_size=8)
    assert (again.threshold, again.window_size, again.compression_ratio) == (0.5, 8, 0.0)


def test_an_attention_mask_with_holes_is_refused(llama, random_gates):
    model, tokenizer = llama
    batch = tokenizer([CONTEXT], return_tensors="pt")
    mask = batch["attention_mask"].clone()
    mask[0, 10:13] = 0
    for press in (FastKVzipPress(0.5, gates=random_gates(model)), FastKVzipScorerPress(0.5, gates=random_gates(model))):
        with pytest.raises(ValueError) as error, torch.no_grad(), press(model):
            model(input_ids=batch["input_ids"], attention_mask=mask)
        assert first_line(error.value).startswith("the attention mask masks tokens inside sequence(s) [0] of the batch")


# ------------------------------------------------------------------------------------------------ messages, logs


def test_a_context_length_too_short_for_ruler_says_what_fits():
    with pytest.raises(ValueError) as error:
        make_ruler_samples(tiny_tokenizer(), 64, n_samples=1, tasks=("niah_single_1",))
    assert first_line(error.value) == (
        "context length 64 leaves no room for niah_single_1's input: its answer alone takes 128 tokens. Use a context "
        "length (--data-dir) above 128, e.g. 1024"
    )


def test_other_libraries_stay_quiet_unless_verbose(tmp_path):
    from transformers.utils import logging as hf_logging

    try:
        main(["generate", "--context-file", str(tmp_path / "none.txt"), "--question", "q"])
        assert not hf_logging.is_progress_bar_enabled()
        assert hf_logging.get_verbosity() == hf_logging.ERROR
        hf_logging.enable_progress_bar()
        hf_logging.set_verbosity_warning()
        main(["-v", "generate", "--context-file", str(tmp_path / "none.txt"), "--question", "q"])
        assert hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()
        hf_logging.set_verbosity_warning()


def test_kvpress_harness_still_records_the_achieved_ratio(llama, random_gates):
    """kvpress's evaluation reads press.compression_ratio after each context, as its own threshold presses report."""
    from fastkvzip_press.evaluation.kvpress_presses import AchievedRatioPress

    model, tokenizer = llama
    press = AchievedRatioPress(threshold=0.5, gates=random_gates(model))
    make_pipeline(model, tokenizer)(CONTEXT, question="what ?", press=press, max_new_tokens=2)
    assert 0 < press.compression_ratio == press.last_stats.compression_ratio < 1
