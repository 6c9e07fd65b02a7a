"""Keys, exact round-trips, verification, atomicity and cross-process locking of harness/activations/cache.py."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import harness.activations.cache as cache_module
from harness.activations.cache import ContentCache, Entry, cache_key, file_sha256, progress

REPO = Path(__file__).resolve().parents[3]


def bits(t: torch.Tensor) -> bytes:
    """The tensor's raw bytes: equality here is exact, NaN payloads and -0.0 included."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert (a[name].dtype, a[name].shape) == (b[name].dtype, b[name].shape), name
        assert bits(a[name]) == bits(b[name]), name


def leftovers(root: Path) -> list[str]:
    """Everything under root except lock files (which are kept on purpose)."""
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.suffix != ".lock"
    ) + sorted(str(p.relative_to(root)) for p in root.rglob(".t*"))


@dataclasses.dataclass(frozen=True)
class Spec:
    layer: int
    lr: float


@dataclasses.dataclass
class MutableSpec:
    layer: int


# --- cache_key ------------------------------------------------------------------------------


def test_key_is_sha256_of_canonical_json() -> None:
    doc = b'{"parts":{"a":1,"b":[0.1,"x",null,true]},"producer":"p","version":"1"}'
    assert cache_key("p", "1", b=[0.1, "x", None, True], a=1) == hashlib.sha256(doc).hexdigest()


def test_key_ignores_dict_order_at_every_level() -> None:
    a = cache_key("p", "1", x=1, cfg={"m": 1, "n": {"q": 2, "r": 3}})
    b = cache_key("p", "1", cfg={"n": {"r": 3, "q": 2}, "m": 1}, x=1)
    assert a == b


@given(st.dictionaries(st.text(), st.one_of(st.integers(), st.floats(), st.text()), max_size=8))
def test_key_is_permutation_invariant(d: dict) -> None:
    assert cache_key("p", "1", d=d) == cache_key("p", "1", d=dict(reversed(list(d.items()))))


def test_float_key_uses_the_value_not_the_spelling() -> None:
    assert cache_key("p", "1", lr=0.1) == cache_key(
        "p", "1", lr=0.1000000000000000055511151231257827
    )
    distinct = [1, 1.0, True, "1", 0.0, -0.0, float("nan"), float("inf"), float("-inf"), None]
    keys = [cache_key("p", "1", v=v) for v in distinct]
    assert len(set(keys)) == len(keys)
    assert cache_key("p", "1", v=float("nan")) == cache_key("p", "1", v=float("nan"))


def test_tuple_and_list_are_the_same_part() -> None:
    assert cache_key("p", "1", v=(1, 2)) == cache_key("p", "1", v=[1, 2])


def test_frozen_dataclass_is_keyed_by_type_and_fields() -> None:
    assert cache_key("p", "1", s=Spec(3, 0.5)) == cache_key("p", "1", s=Spec(3, 0.5))
    assert cache_key("p", "1", s=Spec(3, 0.5)) != cache_key("p", "1", s=Spec(4, 0.5))
    assert cache_key("p", "1", s=Spec(3, 0.5)) != cache_key("p", "1", s={"layer": 3, "lr": 0.5})
    with pytest.raises(TypeError, match="frozen"):
        cache_key("p", "1", s=MutableSpec(3))
    with pytest.raises(TypeError):
        cache_key("p", "1", s=Spec)


def test_dataclass_key_does_not_depend_on_the_module_it_lives_in() -> None:
    # harness/ was regrouped into subpackages once; a move must not orphan the cache.
    moved = dataclasses.make_dataclass("Spec", [("layer", int), ("lr", float)], frozen=True)
    moved.__module__ = "somewhere.else"
    assert cache_key("p", "1", s=moved(3, 0.5)) == cache_key("p", "1", s=Spec(3, 0.5))


def test_dtype_is_keyed_by_name() -> None:
    assert cache_key("p", "1", d=torch.float32) == cache_key("p", "1", d="torch.float32")
    assert cache_key("p", "1", d=torch.float32) != cache_key("p", "1", d=torch.bfloat16)


def test_version_and_producer_are_part_of_the_key() -> None:
    assert cache_key("p", "1", a=1) != cache_key("p", "2", a=1)
    assert cache_key("p", "1", a=1) != cache_key("q", "1", a=1)


@pytest.mark.parametrize("path", [Path("/tmp/x"), PurePosixPath("w.bin"), [Path("a")]])
def test_paths_are_rejected_with_a_pointer_to_content_hashes(path: object) -> None:
    with pytest.raises(TypeError, match="content hash"):
        cache_key("p", "1", weights=path)


@pytest.mark.parametrize("value", [object(), {1, 2}, b"x", torch.tensor(1.0), {1: "a"}])
def test_unknown_types_are_rejected(value: object) -> None:
    with pytest.raises(TypeError):
        cache_key("p", "1", v=value)


def test_file_sha256_hashes_content(tmp_path: Path) -> None:
    (tmp_path / "w").write_bytes(b"abc" * 1000)
    assert file_sha256(tmp_path / "w", chunk=7) == hashlib.sha256(b"abc" * 1000).hexdigest()


# --- round trips ----------------------------------------------------------------------------

DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.float8_e4m3fn,
    torch.float8_e5m2, torch.complex64, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.bool,
]  # fmt: skip


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    """Any bit pattern of any supported dtype (NaN payloads, subnormals, -0.0, int extremes)."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 4), max_size=4))
    n = int(torch.Size(shape).numel())
    size = n * torch.empty((), dtype=dtype).element_size()
    raw = draw(st.binary(min_size=size, max_size=size))
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    u8 = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    if dtype == torch.bool:
        return (u8 % 2).to(torch.bool).reshape(shape)
    return u8.view(dtype).reshape(shape)


@settings(max_examples=60, deadline=None)
@given(st.lists(tensors(), min_size=1, max_size=4))
def test_round_trip_is_bit_exact(ts: list[torch.Tensor]) -> None:
    named = {f"t{i}": t for i, t in enumerate(ts)}
    base = ts[0]
    if base.ndim >= 2:
        named["transposed"] = base.mT  # non-contiguous
    if base.numel() > 1:
        named["view"] = base.reshape(-1)[1:]  # shares storage with t0
        named["alias"] = base  # the same tensor under two names
    with tempfile.TemporaryDirectory() as d:
        cache = ContentCache(Path(d))
        key = cache_key("roundtrip", "1")
        put = cache.put("roundtrip", key, named, {})
        got = cache.get("roundtrip", key)
        assert got is not None
        expected = {k: v.contiguous() for k, v in named.items()}
        assert_identical(put.tensors, expected)
        assert_identical(got.tensors, expected)


def test_int64_and_bf16_extremes_survive() -> None:
    named = {
        "i": torch.tensor([-(2**63), 2**63 - 1, 0], dtype=torch.int64),
        "b": torch.tensor([float("nan"), -0.0, float("inf"), 1e-40], dtype=torch.bfloat16),
        "m": torch.tensor([[True, False]]),
        "s": torch.tensor(3.5),
    }
    with tempfile.TemporaryDirectory() as d:
        cache = ContentCache(Path(d))
        cache.put("x", cache_key("x", "1"), named, {})
        got = cache.get("x", cache_key("x", "1"))
        assert got is not None
        assert_identical(got.tensors, named)


# --- get_or_compute, verification -----------------------------------------------------------


class Counting:
    """A deterministic producer that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> tuple[dict[str, torch.Tensor], dict]:
        self.calls += 1
        g = torch.Generator().manual_seed(0)
        return {"w": torch.randn(8, 5, generator=g), "idx": torch.arange(7)}, {"loss": 0.25}


def test_cached_result_equals_a_fresh_one_and_records_its_provenance(tmp_path: Path) -> None:
    cache, compute = ContentCache(tmp_path), Counting()
    parts = {"layer": 3, "spec": Spec(1, 0.5), "dtype": torch.float32}
    first = cache.get_or_compute("acts", "2", parts, compute)
    second = cache.get_or_compute("acts", "2", parts, compute)
    assert compute.calls == 1
    fresh, _ = Counting()()
    assert_identical(first.tensors, fresh)
    assert_identical(second.tensors, fresh)
    meta = json.loads((second.path / "meta.json").read_text())
    assert meta == second.meta
    assert meta["key"] == cache_key("acts", "2", **parts)
    assert (meta["producer"], meta["version"], meta["loss"]) == ("acts", "2", 0.25)
    assert meta["parts"]["dtype"] == "torch.float32"
    assert meta["sha256"] == file_sha256(second.path / "tensors.safetensors")
    assert meta["compute_seconds"] >= 0.0 and meta["created"]
    assert cache.get_or_compute("acts", "3", parts, compute) is not None
    assert compute.calls == 2  # a new version is a new entry


def _flip_last(p: Path) -> None:
    data = bytearray((p / "tensors.safetensors").read_bytes())
    data[-1] ^= 0x01
    (p / "tensors.safetensors").write_bytes(bytes(data))


def _flip_header(p: Path) -> None:
    data = bytearray((p / "tensors.safetensors").read_bytes())
    data[12] ^= 0x20
    (p / "tensors.safetensors").write_bytes(bytes(data))


def _truncate(p: Path) -> None:
    data = (p / "tensors.safetensors").read_bytes()
    (p / "tensors.safetensors").write_bytes(data[: len(data) // 2])


def _wrong_key(p: Path) -> None:
    meta = json.loads((p / "meta.json").read_text())
    meta["key"] = "0" * 64
    (p / "meta.json").write_text(json.dumps(meta))


CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "flip-data-byte": _flip_last,
    "flip-header-byte": _flip_header,
    "truncate": _truncate,
    "delete-meta": lambda p: (p / "meta.json").unlink(),
    "delete-tensors": lambda p: (p / "tensors.safetensors").unlink(),
    "garbage-meta": lambda p: (p / "meta.json").write_text("{not json"),
    "meta-is-a-list": lambda p: (p / "meta.json").write_text("[]"),
    "meta-of-another-key": _wrong_key,
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corrupt_entry_is_removed_and_recomputed(
    tmp_path: Path, corrupt: Callable[[Path], None]
) -> None:
    cache, compute = ContentCache(tmp_path), Counting()
    entry = cache.get_or_compute("acts", "1", {"n": 1}, compute)
    corrupt(entry.path)
    assert cache.get("acts", entry.meta["key"]) is None
    assert not entry.path.exists()
    again = cache.get_or_compute("acts", "1", {"n": 1}, compute)
    assert compute.calls == 2
    assert_identical(again.tensors, Counting()()[0])
    assert cache.get("acts", entry.meta["key"]) is not None


def test_missing_entry_is_a_miss(tmp_path: Path) -> None:
    assert ContentCache(tmp_path).get("acts", cache_key("acts", "1")) is None


# --- atomicity and races ---------------------------------------------------------------------


def test_failing_compute_leaves_nothing_behind(tmp_path: Path) -> None:
    cache = ContentCache(tmp_path)

    def boom() -> tuple[dict[str, torch.Tensor], dict]:
        raise RuntimeError("producer crashed")

    with pytest.raises(RuntimeError, match="producer crashed"):
        cache.get_or_compute("acts", "1", {"n": 1}, boom)
    assert leftovers(tmp_path) == []
    assert cache.get("acts", cache_key("acts", "1", n=1)) is None


def test_failing_write_removes_its_temp_dir(tmp_path: Path, monkeypatch) -> None:
    cache, real = ContentCache(tmp_path), cache_module._write_synced

    def fail_on_meta(path: Path, data: bytes) -> None:
        if path.name == "meta.json":
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(cache_module, "_write_synced", fail_on_meta)
    with pytest.raises(OSError, match="disk full"):
        cache.get_or_compute("acts", "1", {"n": 1}, Counting())
    assert leftovers(tmp_path) == []


def test_put_keeps_a_pre_existing_valid_entry(tmp_path: Path) -> None:
    cache, key = ContentCache(tmp_path), cache_key("acts", "1")
    mine = cache.put("acts", key, {"v": torch.zeros(3)}, {"who": "first"})
    theirs = cache.put("acts", key, {"v": torch.ones(3)}, {"who": "second"})
    assert theirs.meta["who"] == "first"
    assert_identical(theirs.tensors, mine.tensors)
    assert_identical(cache.get("acts", key).tensors, {"v": torch.zeros(3)})
    assert leftovers(tmp_path) == sorted(str(p.relative_to(tmp_path)) for p in mine.path.iterdir())


def test_put_validates_its_inputs(tmp_path: Path) -> None:
    cache, key = ContentCache(tmp_path), cache_key("acts", "1", n=1)
    with pytest.raises(ValueError, match="reserved"):
        cache.put("acts", key, {}, {"sha256": "x"})
    with pytest.raises(ValueError, match="cache_key"):
        cache.put("acts", key, {}, {}, version="1", parts={"n": 2})
    with pytest.raises(ValueError, match="producer"):
        cache.put("../evil", key, {}, {})
    with pytest.raises(ValueError, match="sha256"):
        cache.get("acts", "not-a-key")
    with pytest.raises(TypeError):
        cache.put("acts", key, {"v": [1, 2]}, {})  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        cache.put("acts", key, {}, {"x": object()})
    assert leftovers(tmp_path) == []


def test_without_flock_racing_writers_all_get_the_winner(tmp_path: Path, monkeypatch) -> None:
    """The lock-free fallback: both compute, one rename wins, both return the winner's entry."""
    monkeypatch.setattr(cache_module, "fcntl", None)
    cache, barrier = ContentCache(tmp_path), threading.Barrier(2, timeout=30)
    results: dict[int, Entry] = {}

    def run(i: int) -> None:
        def compute() -> tuple[dict[str, torch.Tensor], dict]:
            barrier.wait()  # both are computing at once: nothing serialised them
            return {"v": torch.full((4,), float(i))}, {"who": i}

        results[i] = cache.get_or_compute("race", "1", {}, compute)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0].meta["who"] == results[1].meta["who"]
    assert_identical(results[0].tensors, results[1].tensors)
    on_disk = cache.get("race", cache_key("race", "1"))
    assert_identical(on_disk.tensors, results[0].tensors)
    assert len(leftovers(tmp_path)) == 2  # tensors.safetensors + meta.json, no temp dirs


WORKER = """
import hashlib, json, sys, time
from pathlib import Path
repo, root, work, name = sys.argv[1:]
sys.path.insert(0, repo)
import torch
from harness.activations.cache import ContentCache
work = Path(work)
(work / f"ready-{name}").touch()
deadline = time.monotonic() + 60
while len(list(work.glob("ready-*"))) < 2:  # start the two misses together
    if time.monotonic() > deadline:
        sys.exit("peer never started")
    time.sleep(0.005)

def compute():
    with open(work / "counter", "a") as f:
        f.write(name + "\\n")
    time.sleep(1.0)
    return {"w": torch.randn(32, 32), "i": torch.randint(0, 2**62, (9,))}, {"who": name}

entry = ContentCache(Path(root)).get_or_compute("race", "1", {"n": 32}, compute)
blob = b"".join(t.numpy().tobytes() for _, t in sorted(entry.tensors.items()))
print(json.dumps({"digest": hashlib.sha256(blob).hexdigest(), "who": entry.meta["who"]}))
"""


@pytest.mark.skipif(cache_module.fcntl is None, reason="no fcntl.flock on this platform")
def test_two_processes_compute_once(tmp_path: Path) -> None:
    script, work = tmp_path / "worker.py", tmp_path / "work"
    script.write_text(WORKER)
    work.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(REPO), str(tmp_path / "cache"), str(work), name],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(json.loads(out))
    assert len((work / "counter").read_text().splitlines()) == 1
    assert outs[0] == outs[1]  # unseeded random tensors: equal only if computed once


def test_progress_yields_everything_and_is_silent_off_a_tty(capsys) -> None:
    assert list(progress(range(5), desc="harvest", total=5)) == [0, 1, 2, 3, 4]
    assert capsys.readouterr().err == ""
