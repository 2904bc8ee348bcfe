"""ListOps generator: parse-back with an independent evaluator, reproducibility, statistics, TSV format."""

import numpy as np
import pytest

from efformer.data.listops import ListOpsConfig, generate, generate_files, sample_chunk
from efformer.data.loaders import LISTOPS_OOV, read_listops_tsv
from efformer.errors import ConfigError

SMALL = ListOpsConfig(min_len=20, max_len=60, max_depth=4, n_train=200, n_val=20, n_test=20)


def evaluate(source: str) -> tuple[int, int, int]:
    """Independent evaluator: a stack machine over the printed tokens -> (value, length, depth)."""
    stack: list[list] = []
    length = depth = 0
    result = None
    for tok in source.split():
        if tok in "()":
            continue
        length += 1
        if tok.startswith("["):
            stack.append([tok[1:]])
            depth = max(depth, len(stack))
        elif tok == "]":
            op, *args = stack.pop()
            assert 2 <= len(args) <= 10
            srt = sorted(args)
            mid = len(srt) // 2
            value = {"MIN": srt[0], "MAX": srt[-1], "SM": sum(args) % 10,
                     "MED": srt[mid] if len(srt) % 2 else (srt[mid - 1] + srt[mid]) // 2}[op]
            if stack:
                stack[-1].append(value)
            else:
                result = value
        else:
            digit = int(tok)
            if stack:
                stack[-1].append(digit)
            else:
                result = digit
    assert not stack and result is not None
    return result, length, depth + 1  # leaves sit one level below the deepest operator


def test_generated_rows_evaluate_to_their_labels_and_respect_bounds():
    rows = generate(SMALL, seed=3)
    assert len(rows) == SMALL.total and len({s for s, _ in rows}) == SMALL.total  # unique
    for src, label in rows:
        value, length, depth = evaluate(src)
        assert value == label
        assert SMALL.min_len < length < SMALL.max_len
        assert depth <= SMALL.max_depth
        # the printed format: every '(' is closed and an operator with k args has k+1 '(' and k+1 ')'
        assert src.count("(") == src.count(")")


def test_known_format_example():
    # MAX over [2, 9] prints as ( ( ( [MAX 2 ) 9 ) ] ) in the released files
    assert evaluate("( ( ( [MAX 2 ) 9 ) ] )") == (9, 4, 2)
    assert evaluate("( ( ( ( [MED 1 ) 2 ) 6 ) ] )")[0] == 2 and evaluate("( ( ( [MED 1 ) 4 ) ] )")[0] == 2


def test_same_seed_same_bytes_serial_and_parallel(tmp_path):
    a = generate_files(tmp_path / "a", SMALL, seed=7, workers=1)
    b = generate_files(tmp_path / "b", SMALL, seed=7, workers=2)
    c = generate_files(tmp_path / "c", SMALL, seed=8, workers=1)
    for split in a:
        assert a[split].read_bytes() == b[split].read_bytes()
    assert a["train"].read_bytes() != c["train"].read_bytes()
    text = a["train"].read_text()
    assert text.startswith("Source\tTarget\n") and text.count("\n") == SMALL.n_train + 1


def test_tsv_roundtrip_tokens_match_generator_length(tmp_path):
    paths = generate_files(tmp_path, SMALL, seed=1)
    ds = read_listops_tsv(paths["val"])
    rows = generate(SMALL, seed=1)[SMALL.n_train:SMALL.n_train + SMALL.n_val]
    assert len(ds) == SMALL.n_val
    for i, (src, label) in enumerate(rows):
        ex = ds[i]
        assert int(ex["label"]) == label
        assert len(ex["input_ids"]) == evaluate(src)[1]  # one token per operator, ']' and digit
        assert int(ex["input_ids"].min()) >= 1 and int(ex["input_ids"].max()) < LISTOPS_OOV


def test_lra_statistics_match_reference():
    """Reference §2.1 (simulation of the LRA algorithm): mean length ~1033, median ~937, acceptance ~8.2%,
    labels 0: 15.6%, 9: 16.9%, 1-8: 8-9% each."""
    cfg = ListOpsConfig(n_train=2000, n_val=0, n_test=0)
    rows = generate(cfg, seed=0)
    lengths = np.array([evaluate(s)[1] for s, _ in rows])
    assert 500 < lengths.min() and lengths.max() < 2000
    assert abs(lengths.mean() / 1033 - 1) < 0.04
    assert abs(np.median(lengths) / 937 - 1) < 0.06
    freq = np.bincount([v for _, v in rows], minlength=10) / len(rows)
    assert abs(freq[0] - 0.156) < 0.025 and abs(freq[9] - 0.169) < 0.025
    assert np.all(np.abs(freq[1:9] - 0.085) < 0.025)
    accepted, tries = sample_chunk((cfg, 0, 0))
    assert 0.06 < len(accepted) / tries < 0.105


def test_impossible_settings_are_refused():
    with pytest.raises(ConfigError, match="min_len"):
        generate(ListOpsConfig(min_len=500, max_len=2000, max_depth=3), seed=0)
    with pytest.raises(ConfigError, match="unique"):
        generate(ListOpsConfig(min_len=2, max_len=5, max_depth=2, max_args=2, n_train=10_000), seed=0)
