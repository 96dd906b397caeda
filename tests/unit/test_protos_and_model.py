from __future__ import annotations

import hashlib
from pathlib import Path

from services.inference.default_model import PRESETS, ModelShape, build_default_model, llama_config
from services.mesh.rpc.protogen import STUBS_DIR, generate


def test_committed_stubs_match_the_protos(tmp_path: Path) -> None:
    fresh = {p.name: p.read_bytes() for p in generate(tmp_path)}
    committed = {p.name: p.read_bytes() for p in STUBS_DIR.iterdir() if p.name in fresh}
    assert committed.keys() == fresh.keys(), "stubs missing: run `make protos`"
    stale = sorted(name for name in fresh if committed[name] != fresh[name])
    assert not stale, f"stubs drifted from protos/: {stale}; run `make protos`"


def _digests(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_default_model_is_built_byte_for_byte_the_same(model_dir: Path, tmp_path: Path) -> None:
    again = build_default_model(tmp_path / "sluice-tiny")
    assert _digests(again) == _digests(model_dir)


def test_default_model_has_the_documented_shape(model_dir: Path) -> None:
    import json

    config = json.loads((model_dir / "config.json").read_text())
    shape = ModelShape()
    assert config["model_type"] == "llama"
    assert (config["vocab_size"], config["hidden_size"], config["intermediate_size"]) == (4096, 256, 688)
    assert (config["num_hidden_layers"], config["num_attention_heads"]) == (4, 4)
    assert config["max_position_embeddings"] == shape.context_length == 2048
    assert (model_dir / "model.safetensors").exists()
    assert "im_start" in (model_dir / "chat_template.jinja").read_text()


def test_bench_preset_is_about_a_hundred_million_parameters() -> None:
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        params = sum(p.numel() for p in LlamaForCausalLM(llama_config(PRESETS["bench"])).parameters())
    assert 90e6 < params < 110e6
