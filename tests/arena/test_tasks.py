"""LRA task specs and build_datasets: example format, caching, reproducibility, clear errors."""

import pytest
import torch

from efformer.arena.tasks import PAPER_TABLE1, TASK_NAMES, TASKS, build_datasets, get_task
from efformer.errors import DataError, UnknownNameError
from efformer.models.config import build_config


def test_every_task_has_both_presets_and_a_valid_model_config():
    for preset in ("paper", "quick"):
        assert set(TASKS[preset]) == set(TASK_NAMES)
        for name in TASK_NAMES:
            spec = get_task(name, preset)
            cfg = build_config(spec.model_config(mixer="softmax"))
            assert cfg.task == spec.task and cfg.n_classes == spec.n_classes and cfg.vocab_size == spec.vocab_size
            assert cfg.max_len >= spec.seq_len and spec.metric == "accuracy" and spec.optim["steps"] > 0
    paper = get_task("listops", "paper")
    assert (paper.seq_len, paper.model["d_model"], paper.model["n_layers"], paper.optim["lr"]) == (2000, 512, 4, 0.05)
    assert get_task("pathx", "paper").seq_len == 128 * 128 and get_task("retrieval", "paper").task == "dual"
    with pytest.raises(UnknownNameError, match="listops"):
        get_task("listop")


def test_paper_table1_averages():
    for model, row in PAPER_TABLE1.items():
        mean = sum(row[t] for t in ("listops", "text", "retrieval", "image", "pathfinder")) / 5
        assert abs(mean - row["avg"]) < 0.25, model  # Sinkhorn's published average is 0.19 off its mean


def test_quick_listops_and_pathfinder_datasets(tmp_path):
    spec = get_task("listops", "quick")
    train, val, test = build_datasets(spec, data_dir=tmp_path, seed=0)
    assert (len(train), len(val), len(test)) == (spec.data["n_train"], spec.data["n_val"], spec.data["n_test"])
    ex = train[0]
    assert set(ex) == {"input_ids", "label"} and ex["input_ids"].dtype == torch.long and ex["label"].shape == ()
    assert all(spec.data["min_len"] < len(train[i]["input_ids"]) <= spec.seq_len for i in range(50))
    assert int(max(int(train[i]["label"]) for i in range(200))) <= 9
    files = sorted((tmp_path / "generated").rglob("*.tsv"))
    stamp = [f.stat().st_mtime_ns for f in files]
    again = build_datasets("listops", "quick", data_dir=tmp_path, seed=0)[0]  # cached: not regenerated
    assert [f.stat().st_mtime_ns for f in files] == stamp and torch.equal(again[5]["input_ids"], train[5]["input_ids"])

    small = get_task("pathfinder", "quick")
    small = type(small)(**{**small.__dict__, "data": {**small.data, "n": 20}})
    tr, va, te = build_datasets(small, data_dir=tmp_path, seed=1)
    assert (len(tr), len(va), len(te)) == (16, 2, 2)
    assert tr[0]["input_ids"].shape == (1024,) and int(tr[0]["input_ids"].max()) == 255
    assert sum(int(d[i]["label"]) for d in (tr, va, te) for i in range(len(d))) == 10


def test_file_tasks_explain_the_expected_layout(tmp_path):
    with pytest.raises(DataError, match=r"aclImdb/\{train,test\}"):
        build_datasets("text", "quick")
    with pytest.raises(DataError, match="new_aan_pairs.train.tsv"):
        build_datasets("retrieval", "quick", data_dir=tmp_path)
    with pytest.raises(DataError, match="data_batch_1.bin"):
        build_datasets("image", "paper", data_dir=tmp_path)


def test_quick_retrieval_from_files(tmp_path):
    d = tmp_path / "tsv_data"
    d.mkdir()
    for s in ("train", "eval", "test"):
        (d / f"new_aan_pairs.{s}.tsv").write_bytes(b"1\ta\tb\thello\tworld\n0.0\tc\td\tfoo\tbar baz\n")
    train, val, test = build_datasets("retrieval", "quick", data_dir=tmp_path)
    assert len(train) == 2 and set(val[1]) == {"ids1", "ids2", "label"} and int(test[1]["label"]) == 0


def test_generated_cache_is_keyed_by_the_generator_settings(tmp_path):
    import dataclasses

    from efformer.arena.tasks import build_datasets, get_task

    spec = get_task("listops", "quick")
    small = dataclasses.replace(spec, data=dict(spec.data, min_len=8, max_len=24, max_depth=3, n_train=40,
                                                 n_val=10, n_test=10), seq_len=24)
    longer = dataclasses.replace(small, data=dict(small.data, min_len=24, max_len=48), seq_len=48)
    a = build_datasets(small, data_dir=tmp_path)[0]
    b = build_datasets(longer, data_dir=tmp_path)[0]
    assert max(len(a[i]["input_ids"]) for i in range(len(a))) < 24
    assert min(len(b[i]["input_ids"]) for i in range(len(b))) > 24  # not served from the first folder
