"""Truncated, empty and corrupt checkpoint files fail where they are opened, naming the file."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxllm.checkpoints_convert.file_checks import CheckpointFileError, open_safetensors
from jaxllm.checkpoints_convert.gguf_reader import open_gguf


def _write_gguf(path) -> None:
    """A small llama-architecture GGUF: two float32 tensors (2048 + 64 bytes of data)."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((32, 16), np.float32))
    writer.add_tensor("output_norm.weight", np.ones((16,), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _truncate(path, size: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:size])


@pytest.fixture
def gguf_file(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write_gguf(path)
    return path


def test_a_whole_gguf_opens_with_its_tensors(gguf_file):
    reader = open_gguf(gguf_file)
    assert [t.name for t in reader.tensors] == ["token_embd.weight", "output_norm.weight"]
    assert reader.tensors[0].data.shape == (32, 16)


def test_a_gguf_truncated_halfway_names_the_file_and_the_expected_and_actual_data_size(gguf_file):
    size = gguf_file.stat().st_size
    data_start = size - 2048 - 64
    _truncate(gguf_file, size // 2)
    with pytest.raises(CheckpointFileError) as error:
        open_gguf(gguf_file)
    message = str(error.value)
    assert str(gguf_file) in message and "truncated" in message
    assert f"tensor data should be 2112 bytes (a file of {size} bytes)" in message
    assert f"the file is {size // 2} bytes, holding {size // 2 - data_start}" in message
    assert "'token_embd.weight'" in message


def test_a_gguf_missing_only_its_last_bytes_names_the_last_tensor(gguf_file):
    _truncate(gguf_file, gguf_file.stat().st_size - 10)
    with pytest.raises(CheckpointFileError, match="first incomplete tensor is 'output_norm.weight'"):
        open_gguf(gguf_file)


def test_a_gguf_cut_inside_its_header_names_the_file(gguf_file):
    _truncate(gguf_file, 40)
    with pytest.raises(CheckpointFileError, match=r"\(40 bytes\) is not a readable GGUF file") as error:
        open_gguf(gguf_file)
    assert str(gguf_file) in str(error.value)


def test_engine_on_a_truncated_gguf_fails_at_start_naming_it(gguf_file):
    from jaxllm import Engine

    _truncate(gguf_file, gguf_file.stat().st_size // 2)
    with pytest.raises(CheckpointFileError, match="truncated: its tensor data should be 2112 bytes") as error:
        Engine(str(gguf_file))
    assert str(gguf_file) in str(error.value)


@pytest.fixture
def safetensors_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a": np.ones((64, 64), np.float32), "b": np.ones(3, np.float32)}, path)
    return path


def _header_len(path) -> int:
    return int.from_bytes(path.read_bytes()[:8], "little")


def test_a_whole_safetensors_file_opens(safetensors_file):
    with open_safetensors(safetensors_file) as f:
        assert sorted(f.keys()) == ["a", "b"] and f.get_tensor("a").shape == (64, 64)


def test_a_truncated_safetensors_file_names_the_file_and_the_sizes(safetensors_file):
    size = safetensors_file.stat().st_size
    held = size // 2 - 8 - _header_len(safetensors_file)
    _truncate(safetensors_file, size // 2)
    with pytest.raises(CheckpointFileError) as error:
        open_safetensors(safetensors_file)
    assert str(error.value) == (
        f"{safetensors_file} is truncated: its header lists {64 * 64 * 4 + 12} bytes of tensor data "
        f"(a file of {size} bytes) but the file is {size // 2} bytes, holding {held}")


@pytest.mark.parametrize("name, content, match", [
    ("bad.gguf", b"", r"is empty \(0 bytes\), not a GGUF file"),
    ("bad.gguf", b"GGUF\x03\x00", r"\(6 bytes\) is not a readable GGUF file: its header is truncated"),
    ("bad.gguf", b"not a gguf file at all", "GGUF magic invalid"),
    ("model.safetensors", b"", r"is empty \(0 bytes\): a safetensors file starts with an 8-byte"),
    ("model.safetensors", b"\x10\x00", "is only 2 bytes"),
    ("model.safetensors", (1000).to_bytes(8, "little") + b"{}",
     "header should be 1000 bytes but the file holds 2"),
    ("model.safetensors", (5).to_bytes(8, "little") + b"{nope", "not a valid safetensors header"),
    ("model.safetensors", (2).to_bytes(8, "little") + b"[]", "not a valid safetensors header"),
])
def test_an_empty_or_corrupt_file_names_itself_and_the_problem(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content)
    opener = open_gguf if name.endswith(".gguf") else open_safetensors
    with pytest.raises(CheckpointFileError, match=match) as error:
        opener(path)
    assert str(path) in str(error.value)


def _copy_config(tiny_llama_dir, tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copy(tiny_llama_dir[0] / "config.json", model_dir / "config.json")
    return model_dir


def test_engine_on_a_truncated_safetensors_checkpoint_fails_at_start_naming_it(tiny_llama_dir, tmp_path):
    from jaxllm import Engine

    model_dir = _copy_config(tiny_llama_dir, tmp_path)
    weights = model_dir / "model.safetensors"
    shutil.copy(tiny_llama_dir[0] / "model.safetensors", weights)
    _truncate(weights, weights.stat().st_size - 100)
    with pytest.raises(CheckpointFileError, match="is truncated: its header lists") as error:
        Engine(str(model_dir), max_model_len=32, num_blocks=8, warmup=False)
    assert str(weights) in str(error.value)
    weights.write_bytes(b"")
    with pytest.raises(CheckpointFileError, match=r"is empty \(0 bytes\)"):
        Engine(str(model_dir), max_model_len=32, num_blocks=8, warmup=False)


def test_a_corrupt_shard_index_names_the_index(tiny_llama_dir, tmp_path):
    from jaxllm.checkpoints_convert.hf_safetensors import checkpoint_files

    model_dir = _copy_config(tiny_llama_dir, tmp_path)
    (model_dir / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(CheckpointFileError, match="model.safetensors.index.json is not a valid index"):
        checkpoint_files(model_dir)
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointFileError, match="has no 'weight_map'"):
        checkpoint_files(model_dir)
