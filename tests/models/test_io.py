"""save/load: exact round trips, the manifest's integrity check, file modes, clear refusals, and saves
that cannot tear: a SIGKILL at any moment of a save leaves the old model or the new one, never a mix."""

from __future__ import annotations

import collections
import json
import os
import random
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from torch import nn

import efformer
import efformer.models.io as io_mod
from efformer.errors import CheckpointError, ConfigError, EfformerError
from efformer.models.io import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill tests fork a saving child")


def _model(seed: int, preset: str = "lm-tiny", **kw) -> nn.Module:
    torch.manual_seed(seed)
    return efformer.create_model(preset, **kw)


def _bits(model: nn.Module) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """The state dict as raw bytes, so equality is bit-for-bit (NaN and -0.0 included)."""
    return {k: (str(v.dtype), tuple(v.shape), v.detach().cpu().contiguous().numpy().tobytes())
            for k, v in model.state_dict().items()}


def _saved(tmp_path: Path, manifest: bool = True, seed: int = 0) -> Path:
    folder = efformer.save(_model(seed), tmp_path / "m")
    if not manifest:  # a folder made by hand, or by efformer before manifests
        (folder / MANIFEST_FILE).unlink()
    return folder


def _flip(path: Path, byte: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[byte % len(data)] ^= 1 << bit
    path.write_bytes(bytes(data))


def _clean(exc: BaseException) -> None:
    """An efformer error raised on purpose, not a deep traceback re-labelled."""
    assert isinstance(exc, EfformerError)
    assert exc.__context__ is None or exc.__suppress_context__


# ---- round trips, modes, integrity -----------------------------------------------------------
def test_save_load_reproduces_logits_exactly(tmp_path):
    model = efformer.create_model("lm-tiny", positional="fire", tie_embeddings=False).eval()
    ids = torch.randint(0, 256, (2, 9))
    assert efformer.save(model, tmp_path / "m") == tmp_path / "m"
    again = efformer.load(tmp_path / "m").eval()
    assert torch.equal(model(ids), again(ids))
    assert again.cfg == model.cfg
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE]
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no temporaries next to it


@pytest.mark.parametrize("preset", ["classifier-tiny", "dual-tiny"])
def test_every_task_round_trips_bit_for_bit(tmp_path, preset):
    model = _model(3, preset)
    again = efformer.load(efformer.save(model, tmp_path / "m"))
    assert type(again) is type(model) and _bits(again) == _bits(model)


def test_saving_again_replaces_the_model(tmp_path):
    a, b = _model(1), _model(2)
    efformer.save(a, tmp_path / "m")
    efformer.save(b, tmp_path / "m")
    assert _bits(efformer.load(tmp_path / "m")) == _bits(b)
    assert sorted(os.listdir(tmp_path)) == ["m"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        for seed in (1, 2):  # a first save and a replacing one
            folder = efformer.save(_model(seed), tmp_path / "m")
    finally:
        os.umask(old)
    assert (folder.stat().st_mode & 0o777) == 0o777 & ~umask
    for name in (CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE):
        assert ((folder / name).stat().st_mode & 0o777) == 0o666 & ~umask, name


def test_manifest_records_size_and_sha256(tmp_path):
    folder = _saved(tmp_path)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert manifest["format"] == "efformer-model" and manifest["version"] == 1
    assert sorted(manifest["files"]) == [CONFIG_FILE, WEIGHTS_FILE]
    assert manifest["files"][WEIGHTS_FILE]["size"] == (folder / WEIGHTS_FILE).stat().st_size


@pytest.mark.parametrize("where", [0, 9, 200, 5000, 0.5, -1])
def test_a_flipped_bit_in_the_weights_is_refused(tmp_path, where):
    folder = _saved(tmp_path)
    size = (folder / WEIGHTS_FILE).stat().st_size
    _flip(folder / WEIGHTS_FILE, int(where * size) if isinstance(where, float) else where, bit=3)
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_FILE} is corrupt: its SHA-256 .*re-save") as e:
        efformer.load(folder)
    _clean(e.value)


@pytest.mark.parametrize("where", [0, 1, 20, -2])
def test_a_flipped_bit_in_the_config_is_refused(tmp_path, where):
    folder = _saved(tmp_path)
    _flip(folder / CONFIG_FILE, where)
    with pytest.raises(CheckpointError, match=rf"{CONFIG_FILE} is corrupt: its SHA-256 .*re-save"):
        efformer.load(folder)


def test_a_config_digit_edited_after_saving_is_refused(tmp_path):
    # '8' ^ 1 == '9': still valid JSON, but a different model; only the manifest can tell.
    folder = _saved(tmp_path)
    text = (folder / CONFIG_FILE).read_text()
    (folder / CONFIG_FILE).write_text(text.replace('"max_len": 1024', '"max_len": 1025'))
    with pytest.raises(CheckpointError, match=rf"{CONFIG_FILE} is corrupt.*delete {MANIFEST_FILE}"):
        efformer.load(folder)
    (folder / MANIFEST_FILE).unlink()  # the documented way to load a folder edited on purpose
    assert efformer.load(folder).cfg.max_len == 1025


def test_truncation_is_refused_with_both_sizes(tmp_path):
    folder = _saved(tmp_path)
    w = folder / WEIGHTS_FILE
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_FILE} has 1000 bytes but {MANIFEST_FILE} records \d+"):
        efformer.load(folder)


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (lambda m: m.replace('"efformer-model"', '"other"'), "not an efformer model manifest"),
        (lambda m: m.replace('"version": 1', '"version": 2'), "has version 2"),
        (lambda m: m.replace(CONFIG_FILE, "x.json"), "must list config.json"),
        (lambda m: m[: len(m) // 2], "manifest.json is corrupt"),
        (lambda m: "[]", "not an efformer model manifest"),
    ],
)
def test_a_damaged_manifest_is_refused(tmp_path, edit, pattern):
    folder = _saved(tmp_path)
    (folder / MANIFEST_FILE).write_text(edit((folder / MANIFEST_FILE).read_text()))
    with pytest.raises(CheckpointError, match=pattern) as e:
        efformer.load(folder)
    _clean(e.value)


def test_any_flipped_bit_in_the_manifest_is_refused(tmp_path):
    folder = _saved(tmp_path)
    good = (folder / MANIFEST_FILE).read_bytes()
    rng = random.Random(0)
    for _ in range(40):
        data = bytearray(good)
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        (folder / MANIFEST_FILE).write_bytes(bytes(data))
        with pytest.raises(CheckpointError):
            efformer.load(folder)


def test_a_folder_without_manifest_loads_after_structural_checks(tmp_path):
    model = _model(5)
    folder = efformer.save(model, tmp_path / "m")
    (folder / MANIFEST_FILE).unlink()
    assert _bits(efformer.load(folder)) == _bits(model)


def test_random_damage_to_a_folder_without_manifest_never_escapes_as_a_raw_error(tmp_path):
    folder = _saved(tmp_path, manifest=False)
    good = {n: (folder / n).read_bytes() for n in (CONFIG_FILE, WEIGHTS_FILE)}
    rng = random.Random(1)
    for trial in range(60):
        name = (CONFIG_FILE, WEIGHTS_FILE)[trial % 2]
        data = bytearray(good[name])
        if trial % 3 == 0:
            data = data[: rng.randrange(len(data))]
        else:  # header region: the part a flip can make unparseable
            data[rng.randrange(min(len(data), 600))] ^= 1 << rng.randrange(8)
        (folder / name).write_bytes(bytes(data))
        try:
            efformer.load(folder)
        except CheckpointError as e:
            _clean(e)
        (folder / name).write_bytes(good[name])


# ---- refusals: every bad input names the path or field, the value and the fix -------------------
def test_save_refuses_a_path_under_a_file(tmp_path):
    (tmp_path / "some_file").write_text("x")
    with pytest.raises(CheckpointError, match=r"some_file is a file, not a folder; choose a path") as e:
        efformer.save(_model(0), tmp_path / "some_file" / "model")
    _clean(e.value)


def test_save_refuses_an_existing_file(tmp_path):
    (tmp_path / "m").write_text("x")
    with pytest.raises(CheckpointError, match=r"cannot save to .*m: it is a file, not a folder"):
        efformer.save(_model(0), tmp_path / "m")
    assert (tmp_path / "m").read_text() == "x"


@pytest.mark.parametrize("thing", [nn.Linear(2, 2), "lm-tiny", None])
def test_save_refuses_what_is_not_an_efformer_model_before_writing(tmp_path, thing):
    with pytest.raises(ConfigError, match=r"model=.* is invalid: save takes an efformer model") as e:
        efformer.save(thing, tmp_path / "new" / "m")
    _clean(e.value)
    assert not (tmp_path / "new").exists()


def test_save_refuses_a_wrapped_model_and_names_the_unwrap(tmp_path):
    with pytest.raises(ConfigError, match=r"model='Sequential'.*unwrap DDP/FSDP \(.module\)"):
        efformer.save(nn.Sequential(_model(0)), tmp_path / "m")


@pytest.mark.parametrize("directory", [3, None, ""])
def test_save_and_load_refuse_a_non_path(tmp_path, directory):
    with pytest.raises(ConfigError, match="directory="):
        efformer.save(_model(0), directory)
    with pytest.raises(ConfigError, match="directory="):
        efformer.load(directory)


def test_save_refuses_a_folder_holding_other_files(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"holds files that are not part of a saved model \(notes.txt\)"):
        efformer.save(_model(0), tmp_path / "m")
    assert (tmp_path / "m" / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_save_replaces_an_empty_folder_and_old_style_leftovers(tmp_path):
    (tmp_path / "m").mkdir()
    efformer.save(_model(0), tmp_path / "m")
    (tmp_path / "m" / ".model.safetensors.abc123.tmp").write_bytes(b"half")  # efformer's older per-file temps
    efformer.save(_model(1), tmp_path / "m")
    assert sorted(os.listdir(tmp_path / "m")) == [CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE]


def test_load_refuses_cuda_without_cuda(tmp_path, monkeypatch):
    folder = _saved(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"map_location='cuda' is invalid: CUDA is not available.*use 'cpu'") as e:
        efformer.load(folder, map_location="cuda")
    _clean(e.value)


def test_load_refuses_a_cuda_index_the_machine_lacks(tmp_path, monkeypatch):
    folder = _saved(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"map_location='cuda:3' is invalid: this machine has 1 CUDA device"):
        efformer.load(folder, map_location="cuda:3")


@pytest.mark.parametrize("where", ["gpu", "meta", "cuda:x", 3.5])
def test_load_refuses_an_unknown_map_location(tmp_path, where):
    with pytest.raises(ConfigError, match="map_location="):
        efformer.load(_saved(tmp_path), map_location=where)


def test_load_takes_a_torch_device(tmp_path):
    assert next(efformer.load(_saved(tmp_path), map_location=torch.device("cpu")).parameters()).device.type == "cpu"


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        (b"[1, 2]", r"config.json holds an array \('\[1, 2\]'\) but a model config is a JSON object"),
        (b"3", r"config.json holds a number \('3'\)"),
        (b'"lm"', r"config.json holds a string"),
        (b"null", r"config.json holds null"),
        (b"{not json", r"config.json is not valid JSON \(.* at line 1, column 2\); re-save"),
        (b"\xff\xfe{}", r"config.json is not UTF-8 text \(bad byte at offset 0\)"),
        (b'{"d_model": -1}', r"config.json is not a valid model config: d_model=-1 is invalid"),
        (b'{"nlayers": 2}', r"config.json is not a valid model config: nlayers"),
        (b'{"mixer": "sofmax"}', r"config.json is not a valid model config: .*did you mean 'softmax'"),
    ],
)
def test_load_refuses_a_bad_config_file(tmp_path, text, pattern):
    folder = _saved(tmp_path, manifest=False)
    (folder / CONFIG_FILE).write_bytes(text)
    with pytest.raises(CheckpointError, match=pattern) as e:
        efformer.load(folder)
    _clean(e.value)


@pytest.mark.parametrize("name", [CONFIG_FILE, WEIGHTS_FILE])
@pytest.mark.parametrize("manifest", [True, False])
def test_load_refuses_a_missing_file(tmp_path, name, manifest):
    folder = _saved(tmp_path, manifest=manifest)
    (folder / name).unlink()
    with pytest.raises(CheckpointError, match=rf"m/{name} is missing; a saved model is a folder"):
        efformer.load(folder)


def test_load_refuses_a_missing_folder_and_a_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nothing is missing; pass a folder made by efformer.save"):
        efformer.load(tmp_path / "nothing")
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match=r"f is a file, not a model folder"):
        efformer.load(tmp_path / "f")


def test_load_refuses_a_truncated_weights_file_without_manifest(tmp_path):
    folder = _saved(tmp_path, manifest=False)
    w = folder / WEIGHTS_FILE
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_FILE} is truncated or corrupt .*re-save") as e:
        efformer.load(folder)
    _clean(e.value)


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        (dict(d_model=64), r"'backbone.embed.weight' has shape \(256, 128\) but .*config.json needs \(256, 64\)"),
        (dict(n_layers=3), r"does not match .*config.json: \d+ missing tensors \['backbone.blocks.2"),
        (dict(n_layers=1), r"0 missing tensors \[\], \d+ unexpected tensors \['backbone.blocks.1"),
    ],
)
def test_load_refuses_weights_that_do_not_fit_the_config(tmp_path, change, pattern):
    folder = _saved(tmp_path, manifest=False)
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps({**cfg, **change}))
    with pytest.raises(CheckpointError, match=pattern) as e:
        efformer.load(folder)
    _clean(e.value)


# ---- failed saves and leftovers --------------------------------------------------------------
def _boom(tensors, path, metadata=None):
    Path(path).write_bytes(b"partial")
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("first", [True, False])
def test_a_failed_save_keeps_the_old_folder_and_leaves_no_temporaries(tmp_path, monkeypatch, first):
    parent, a = tmp_path / "models", _model(1)
    if not first:
        efformer.save(a, parent / "m")
    monkeypatch.setattr(io_mod, "save_file", _boom)
    kept = "nothing was written" if first else "the model already at .* is unchanged"
    with pytest.raises(CheckpointError, match=rf"could not save to .*m \(.*No space left on device\); {kept}") as e:
        efformer.save(_model(2), parent / "m")
    _clean(e.value)
    assert sorted(os.listdir(parent)) == ([] if first else ["m"])
    if not first:
        assert _bits(efformer.load(parent / "m")) == _bits(a)


def test_an_interrupt_during_a_save_cleans_up_and_propagates(tmp_path, monkeypatch):
    a = efformer.save(_model(1), tmp_path / "m")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(io_mod, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        efformer.save(_model(2), tmp_path / "m")
    assert sorted(os.listdir(tmp_path)) == ["m"]
    assert _bits(efformer.load(a)) == _bits(_model(1))


def test_a_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    a = _model(1)
    efformer.save(a, tmp_path / "m")
    real = os.rename

    def failing(src, dst, *args, **kwargs):
        if ".tmp-" in os.fspath(src):  # the second rename of the swap: the old folder is already aside
            raise OSError(5, "Input/output error")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(CheckpointError, match="Input/output error.*unchanged"):
        efformer.save(_model(2), tmp_path / "m")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["m"]
    assert _bits(efformer.load(tmp_path / "m")) == _bits(a)


def test_the_next_save_removes_stale_temporaries_only_of_its_own_folder(tmp_path):
    efformer.save(_model(1), tmp_path / "m")
    for name in (".m.tmp-dead01", ".m.old-dead02", ".n.tmp-other", ".mm.tmp-other"):
        (tmp_path / name).mkdir()
        (tmp_path / name / WEIGHTS_FILE).write_bytes(b"half")
    (tmp_path / ".m.tmp-file").write_bytes(b"x")
    efformer.save(_model(2), tmp_path / "m")
    assert sorted(os.listdir(tmp_path)) == [".mm.tmp-other", ".n.tmp-other", "m"]


def test_a_swap_interrupted_between_its_renames_loads_the_old_model(tmp_path):
    a, b = _model(1), _model(2)
    efformer.save(a, tmp_path / "m")
    efformer.save(b, tmp_path / "next")
    # The state a kill between the two renames leaves: m moved aside, the new folder complete beside it.
    os.rename(tmp_path / "m", tmp_path / ".m.old-0123")
    os.rename(tmp_path / "next", tmp_path / ".m.tmp-0123")
    assert _bits(efformer.load(tmp_path / "m")) == _bits(a)
    efformer.save(b, tmp_path / "m")  # the next save finishes the job and tidies up
    assert sorted(os.listdir(tmp_path)) == ["m"]
    assert _bits(efformer.load(tmp_path / "m")) == _bits(b)


def test_a_stale_old_folder_without_its_partner_is_never_loaded(tmp_path):
    efformer.save(_model(1), tmp_path / "m")
    os.rename(tmp_path / "m", tmp_path / ".m.old-0123")  # e.g. the user deleted m after a kill mid-cleanup
    with pytest.raises(CheckpointError, match="is missing"):
        efformer.load(tmp_path / "m")


# ---- SIGKILL at any moment -------------------------------------------------------------------
def _fork(fn) -> int:
    """Run ``fn`` in a forked child that never returns into pytest: exit 0, or 3 after printing the traceback."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 3
    try:
        fn()
        code = 0
    except BaseException:
        traceback.print_exc()
    os._exit(code)


def _wait(pid: int) -> int:
    return os.waitpid(pid, 0)[1]


def _killed(status: int) -> bool:
    if os.WIFEXITED(status):
        assert os.WEXITSTATUS(status) == 0, "the save in the child raised (its traceback is above)"
        return False
    assert os.WTERMSIG(status) == signal.SIGKILL
    return True


def _which(model: nn.Module, known: dict[str, dict]) -> str:
    """The name of the known model ``model`` equals bit-for-bit; a mix fails the test, naming the odd tensors."""
    bits = _bits(model)
    for name, other in known.items():
        if bits == other:
            return name
    odd = {k: [n for n, o in known.items() if o.get(k) == v] for k, v in bits.items()}
    raise AssertionError(f"loaded a mix of models: tensor -> models it matches: {odd}")


PRE_INSTALL = {"writing files", "written, before the rename", "target missing (between the renames)"}


def _phase(parent: Path, before: set[str], target_before: bool) -> str:
    """Where the save was killed, read from what it left in ``parent`` (its temporaries have fresh names)."""
    now = set(os.listdir(parent))
    new = now - before
    new_tmp = sorted(n for n in new if ".tmp-" in n)
    if "m" not in now:
        return "target missing (between the renames)" if target_before else "target missing before and after"
    if any(".old-" in n for n in new):
        return "deleting the old folder"
    if new_tmp:
        try:
            json.loads((parent / new_tmp[0] / MANIFEST_FILE).read_text())
            return "written, before the rename"
        except (OSError, ValueError):
            return "writing files"
    return "not started, or finished"


def _timed_save(model: nn.Module, target: Path) -> float:
    """Seconds from the fork's return in the parent (where a kill delay starts) to the end of the child's save."""
    read, write = os.pipe()
    pid = _fork(lambda: (efformer.save(model, target), os.write(write, str(time.perf_counter()).encode())))
    start = time.perf_counter()  # CLOCK_MONOTONIC: one clock for parent and child
    assert not _killed(_wait(pid))
    end = float(os.read(read, 64))
    os.close(read)
    os.close(write)
    return end - start


def _kill_saves(tmp_path: Path, kills: int, seed: int) -> tuple[collections.Counter, collections.Counter]:
    """SIGKILL a child's save at random moments, alternating two models into one folder; check each result."""
    models = {"A": _model(1, d_model=256), "B": _model(2, d_model=256)}  # same shapes, ~6.5 MB of weights
    known = {k: _bits(m) for k, m in models.items()}
    parent = tmp_path / "models"
    target = parent / "m"
    efformer.save(models["A"], target)
    # Whole saves of B in forked children set the range of the kill delays (the median of three).
    duration = sorted(_timed_save(models["B"], target) for _ in range(3))[1]
    prev = "B"
    rng = random.Random(seed)
    phases: collections.Counter = collections.Counter()
    outcomes: collections.Counter = collections.Counter()
    for i in range(kills):
        new = "B" if prev == "A" else "A"  # always the other model, so each outcome tells old from new
        before, target_before = set(os.listdir(parent)), target.is_dir()
        # The child saves once and then waits, so every kill lands in at most one save.
        pid = _fork(lambda m=models[new]: (efformer.save(m, target), time.sleep(60)))
        time.sleep(rng.uniform(0, 1.2 * duration))
        os.kill(pid, signal.SIGKILL)
        assert _killed(_wait(pid))
        phase = _phase(parent, before, target_before)
        try:
            got = _which(efformer.load(target), known)
        except CheckpointError as e:  # allowed by the contract, but this scheme always leaves a model
            outcomes["CheckpointError"] += 1
            pytest.fail(f"kill {i} ({phase}): {e}")
        outcomes[got] += 1
        assert got in {prev, new}, (i, phase)
        if phase == "not started, or finished" and prev != new:
            phase = "not started" if got == prev else "finished"
        phases[phase] += 1
        if phase in PRE_INSTALL:
            assert got == prev, f"kill {i} ({phase}) loaded the model of an unfinished save"
        if phase == "deleting the old folder":
            assert got == new, f"kill {i} ({phase}) loaded the old model after the swap"
        prev = got
        if rng.random() < 0.3:  # now and then a clean save, which must tidy every leftover
            efformer.save(models[new], target)
            prev = new
            assert os.listdir(parent) == ["m"]
    efformer.save(models["A"], target)
    assert os.listdir(parent) == ["m"]
    assert _which(efformer.load(target), known) == "A"
    print(f"\n{kills} kills over saves of {duration * 1000:.0f} ms: phases {dict(phases)}; outcomes {dict(outcomes)}")
    return phases, outcomes


@needs_fork
def test_a_save_killed_at_random_moments_leaves_one_whole_model(tmp_path):
    phases, outcomes = _kill_saves(tmp_path, kills=40, seed=0)
    assert outcomes["A"] and outcomes["B"]
    # The delays span the whole save: kills landed while writing and at or after the install.
    assert "writing files" in phases and {"deleting the old folder", "finished"} & set(phases)


@needs_fork
@pytest.mark.slow
def test_many_saves_killed_at_random_moments_leave_one_whole_model(tmp_path):
    phases, _ = _kill_saves(tmp_path, kills=200, seed=1)
    assert len(phases) >= 4


_FS_CALLS = ("mkdir", "rename", "replace", "unlink", "rmdir", "fsync", "chmod")


def _die_before_call(n: int) -> None:
    """In a child: SIGKILL this process just before its n-th file-system call of the kinds in _FS_CALLS."""
    count = [0]

    def deadly(real):
        def call(*args, **kwargs):
            count[0] += 1
            if count[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        return call

    for name in _FS_CALLS:
        setattr(os, name, deadly(getattr(os, name)))


@needs_fork
@pytest.mark.parametrize("first", [False, True], ids=["replace", "first-save"])
def test_a_save_killed_before_each_file_system_step_leaves_one_whole_model(tmp_path, first):
    a, b = _model(1), _model(2)
    known = {"A": _bits(a), "B": _bits(b)}
    parent = tmp_path / "models"
    results = []
    for n in range(1, 100):
        shutil.rmtree(parent, ignore_errors=True)
        parent.mkdir()
        if not first:
            efformer.save(a, parent / "m")
        before, target_before = set(os.listdir(parent)), (parent / "m").is_dir()
        if not _killed(_wait(_fork(lambda n=n: (_die_before_call(n), efformer.save(b, parent / "m"))))):
            break  # n is past the last step: the save completed
        phase = _phase(parent, before, target_before)
        try:
            results.append((phase, _which(efformer.load(parent / "m"), known)))
        except CheckpointError as e:
            assert first and "is missing" in str(e), (n, phase, e)  # a first save not yet renamed into place
            results.append((phase, "missing"))
    else:
        pytest.fail("the save never completed")
    print(f"\n{len(results)} kill points: {results}")
    outcome = [r for _, r in results]
    old = "missing" if first else "A"
    # Old until the one rename that installs the new folder, new from then on: never back, never a mix.
    switch = outcome.index("B") if "B" in outcome else len(outcome)
    assert outcome == [old] * switch + ["B"] * (len(outcome) - switch), results
    assert 0 < switch < len(outcome), results
    if not first:  # the kill between the two renames happened, and it loaded the old model
        assert ("target missing (between the renames)", "A") in results, results
        assert ("deleting the old folder", "B") in results, results


def test_extra_files_travel_inside_the_folder_swap(tmp_path):
    out = tmp_path / "m"
    efformer.save(_model(0), out, extra={"tokenizer.json": b'{"v": 1}'})
    assert (out / "tokenizer.json").read_bytes() == b'{"v": 1}'
    efformer.save(_model(1), out, extra={"tokenizer.json": b'{"v": 2}'})  # a folder with a tokenizer re-saves
    assert (out / "tokenizer.json").read_bytes() == b'{"v": 2}' and _bits(efformer.load(out)) == _bits(_model(1))
    efformer.save(_model(1), out)  # the folder is replaced whole: no extra, no tokenizer
    assert not (out / "tokenizer.json").exists()
    with pytest.raises(ConfigError, match="extra"):
        efformer.save(_model(0), tmp_path / "n", extra={"notes.txt": b"x"})
    assert not (tmp_path / "n").exists()
