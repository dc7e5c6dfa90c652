"""Checkpoint reading and writing: round trips, byte ranges, validation and every bad input."""

import json
import os
import struct

import pytest
import torch

from qwen3next.errors import CheckpointError
from qwen3next.weights import INDEX_FILE, SINGLE_FILE, CheckpointReader, write_checkpoint


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.gate.weight": torch.randn(4, 8, generator=g),
        "model.layers.0.input_layernorm.weight": torch.randn(8, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.randn(8, generator=g),
        "lm_head.weight": torch.randn(16, 8, generator=g),
        "counts": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    }


def _assert_same(reader: CheckpointReader, tensors: dict[str, torch.Tensor]) -> None:
    assert reader.names() == sorted(tensors)
    for name, want in tensors.items():
        assert name in reader
        assert reader.shape(name) == tuple(want.shape)
        assert reader.dtype(name) == want.dtype
        got = reader.read(name)
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert reader.total_bytes() == sum(t.nbytes for t in tensors.values())


def _no_temp_files(folder) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


def _sharded(tmp_path):
    tensors = _tensors()
    files = write_checkpoint(tmp_path, iter(tensors.items()), max_shard_bytes=300)
    return tensors, files


def test_single_file_round_trip(tmp_path):
    tensors = _tensors()
    files = write_checkpoint(tmp_path, iter(tensors.items()), metadata={"quant": "none"})
    assert files == [tmp_path / SINGLE_FILE]
    assert sorted(p.name for p in tmp_path.iterdir()) == [SINGLE_FILE]
    with CheckpointReader(tmp_path) as reader:
        _assert_same(reader, tensors)


def test_sharded_round_trip_and_index(tmp_path):
    tensors, files = _sharded(tmp_path)
    n = len(files)
    assert n > 2
    assert [p.name for p in files] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    _no_temp_files(tmp_path)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    assert list(index["weight_map"]) == sorted(tensors)
    assert set(index["weight_map"].values()) == {p.name for p in files}
    with CheckpointReader(tmp_path) as reader:
        _assert_same(reader, tensors)
        assert reader.file_of("lm_head.weight").name == index["weight_map"]["lm_head.weight"]
        counts = reader.read_flat("counts", 2, 5)  # a chunk, as the converter reads big tensors
        assert torch.equal(counts, tensors["counts"].flatten()[2:5])


def test_rewrite_replaces_stale_files(tmp_path):
    _sharded(tmp_path)
    write_checkpoint(tmp_path, [("x", torch.ones(3))])
    assert sorted(p.name for p in tmp_path.iterdir()) == [SINGLE_FILE]
    assert CheckpointReader(tmp_path).names() == ["x"]


def test_writer_copes_with_views_and_failures(tmp_path):
    fused = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    pieces = {"a": fused[:2], "b": fused[2:], "t": fused.t()}
    write_checkpoint(tmp_path / "views", pieces.items())
    _assert_same(CheckpointReader(tmp_path / "views"), pieces)

    def broken():
        yield "a", torch.ones(100)
        yield "b", torch.ones(100)
        raise RuntimeError("source failed")

    with pytest.raises(RuntimeError):
        write_checkpoint(tmp_path / "broken", broken(), max_shard_bytes=400)
    assert list((tmp_path / "broken").iterdir()) == []


def test_byte_range_points_at_tensor_bytes(tmp_path):
    tensors, _ = _sharded(tmp_path)
    reader = CheckpointReader(tmp_path)
    for name, want in tensors.items():
        path, start, length = reader.byte_range(name)
        assert path == reader.file_of(name) and length == want.nbytes
        with open(path, "rb") as f:
            f.seek(start)
            raw = f.read(length)
        assert raw == want.contiguous().view(torch.uint8).numpy().tobytes()


def test_validate(tmp_path):
    tensors = _tensors()
    write_checkpoint(tmp_path, tensors.items())
    reader = CheckpointReader(tmp_path)
    expected = {n: tuple(t.shape) for n, t in tensors.items()}
    reader.validate(expected)
    reader.validate({**expected, "mtp.fc.weight": (8, 16)}, optional_prefixes=("mtp.",))

    wrong = dict(expected)
    del wrong["counts"]
    wrong["lm_head.weight"] = (8, 16)
    wrong.update({f"missing.{i}": (1,) for i in range(12)})
    with pytest.raises(CheckpointError) as err:
        reader.validate(wrong)
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path) in msg
    assert "missing 12" in msg and "... and 7 more" in msg
    assert "unexpected 1 (counts)" in msg
    assert "lm_head.weight: got (16, 8), expected (8, 16)" in msg


def test_validate_optional_prefix_present_must_match(tmp_path):
    write_checkpoint(tmp_path, [("mtp.fc.weight", torch.ones(2, 2)), ("mtp.extra", torch.ones(1))])
    with pytest.raises(CheckpointError) as err:
        CheckpointReader(tmp_path).validate({"mtp.fc.weight": (4, 4)}, optional_prefixes=("mtp.",))
    assert "unexpected 1 (mtp.extra)" in str(err.value)
    assert "mtp.fc.weight: got (2, 2), expected (4, 4)" in str(err.value)


def _error(folder) -> str:
    with pytest.raises(CheckpointError) as err:
        CheckpointReader(folder)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def _write_index(folder, weight_map) -> None:
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_missing_folder_and_files(tmp_path):
    assert str(tmp_path / "nope") in _error(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    assert "not a folder" in _error(tmp_path / "file")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no model.safetensors and no" in _error(empty)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"metadata": {}}', '{"weight_map": {"a": 3}}'])
def test_bad_index(tmp_path, text):
    (tmp_path / INDEX_FILE).write_text(text)
    assert str(tmp_path / INDEX_FILE) in _error(tmp_path)


def test_index_names_missing_shard(tmp_path):
    _write_index(tmp_path, {"a": "model-00001-of-00002.safetensors"})
    msg = _error(tmp_path)
    assert INDEX_FILE in msg and "model-00001-of-00002.safetensors" in msg and "does not exist" in msg


@pytest.mark.parametrize(
    "name", ["../x.safetensors", "/abs/x.safetensors", "sub/../../x.safetensors", "..\\x.safetensors", "C:\\x.safetensors"]
)
def test_index_escaping_folder(tmp_path, name):
    model = tmp_path / "model"
    model.mkdir()
    write_checkpoint(tmp_path, [("a", torch.ones(2))])  # a real file sits at ../model.safetensors
    (tmp_path / "x.safetensors").write_bytes((tmp_path / SINGLE_FILE).read_bytes())
    _write_index(model, {"a": name})
    msg = _error(model)
    assert INDEX_FILE in msg and "outside the model folder" in msg


def test_symlink_outside_folder_refused(tmp_path):
    outside = tmp_path / "outside"
    write_checkpoint(outside, [("a", torch.ones(2))])
    model = tmp_path / "model"
    model.mkdir()
    os.symlink(outside / SINGLE_FILE, model / "model-00001-of-00001.safetensors")
    _write_index(model, {"a": "model-00001-of-00001.safetensors"})
    assert "outside the model folder" in _error(model)


def test_hub_cache_snapshot_links_allowed(tmp_path):
    blobs = tmp_path / "models--org--name" / "blobs"
    write_checkpoint(blobs, [("a", torch.ones(2))])
    os.rename(blobs / SINGLE_FILE, blobs / "0123abcd")
    snapshot = tmp_path / "models--org--name" / "snapshots" / "rev"
    snapshot.mkdir(parents=True)
    os.symlink("../../blobs/0123abcd", snapshot / SINGLE_FILE)
    assert CheckpointReader(snapshot).names() == ["a"]


def test_index_tensor_not_in_shard(tmp_path):
    _, files = _sharded(tmp_path)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    index["weight_map"]["ghost.weight"] = files[0].name
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    msg = _error(tmp_path)
    assert str(files[0]) in msg and "ghost.weight" in msg


def test_shard_tensors_not_in_index_are_ignored(tmp_path):
    tensors, _ = _sharded(tmp_path)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    del index["weight_map"]["counts"]
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    assert CheckpointReader(tmp_path).names() == sorted(set(tensors) - {"counts"})


def _single(tmp_path):
    write_checkpoint(tmp_path, _tensors().items())
    return tmp_path / SINGLE_FILE


@pytest.mark.parametrize("keep", [0, 5, 8, 20], ids=["empty", "short-prefix", "no-header", "cut-header"])
def test_truncated_header(tmp_path, keep):
    path = _single(tmp_path)
    os.truncate(path, keep)
    msg = _error(tmp_path)
    assert str(path) in msg and "truncated" in msg


def test_truncated_data(tmp_path):
    path = _single(tmp_path)
    os.truncate(path, path.stat().st_size - 1)
    msg = _error(tmp_path)
    assert str(path) in msg and "truncated" in msg


def test_truncated_shard(tmp_path):
    _, files = _sharded(tmp_path)
    os.truncate(files[-1], files[-1].stat().st_size - 4)
    msg = _error(tmp_path)
    assert str(files[-1]) in msg and "truncated" in msg


def _rewrite_header(path, edit) -> None:
    """Replace the shard's header by edit(header bytes), keeping the data after it."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = edit(raw[8 : 8 + n])
    path.write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + n :])


def test_corrupt_header_bytes(tmp_path):
    path = _single(tmp_path)
    _rewrite_header(path, lambda h: b"\xff" + h[1:])
    msg = _error(tmp_path)
    assert str(path) in msg and "not valid JSON" in msg


def test_unknown_dtype(tmp_path):
    path = _single(tmp_path)
    _rewrite_header(path, lambda h: h.replace(b'"I64"', b'"Q7"'))
    msg = _error(tmp_path)
    assert str(path) in msg and "'Q7'" in msg


def test_offsets_not_matching_shape(tmp_path):
    path = _single(tmp_path)

    def edit(h):
        header = json.loads(h)
        header["counts"]["shape"] = [2, 4]
        return json.dumps(header).encode()

    _rewrite_header(path, edit)
    msg = _error(tmp_path)
    assert str(path) in msg and "'counts'" in msg
