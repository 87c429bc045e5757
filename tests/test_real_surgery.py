"""Surgery on the real pretrained assets: prune, save, reload with plain transformers (slow)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModel, AutoModelForCausalLM

from fusion_prune.cli import main
from fusion_prune.models import load_native, load_tokenizer
from fusion_prune.surgery import count_parameters, drop_layers

pytestmark = pytest.mark.slow

SENTENCES = ["the film was a quiet triumph", "an overlong, tedious mess that never finds its footing"]


# Parameters per layer, by hand:
#   MiniLM (h=384, ffn 1536): attention 4*(384*384+384) + ffn (384*1536+1536) + (1536*384+384)
#                             + 2 LayerNorms 4*384 = 1,774,464
#   MPNet (h=768, ffn 3072): 4*(768*768+768) + (768*3072+3072) + (3072*768+768) + 4*768 = 7,087,872
#   SmolLM2 (h=576, 9 heads, 3 KV heads of 64, ffn 1536, no biases): q,o 2*576*576 + k,v 2*576*192
#                             + gate,up,down 3*576*1536 + 2 RMSNorms 2*576 = 3,540,096
@pytest.mark.parametrize("name, drop, auto, layers, params_after", [
    ("minilm-l6", "1,3,5", AutoModel, 3, 22_713_216 - 3 * 1_774_464),
    ("mpnet-base", "1,3,5,7,9,11", AutoModel, 6, 109_486_464 - 6 * 7_087_872),
    ("smollm2-135m", ",".join(str(i) for i in range(1, 30, 2)), AutoModelForCausalLM, 15,
     134_515_008 - 15 * 3_540_096),
])
def test_real_prune_round_trip(name, drop, auto, layers, params_after, tmp_path):
    out = tmp_path / "pruned"
    res = CliRunner().invoke(main, ["prune", "--model", name, "--drop", drop, "-o", str(out)])
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "fusionprune_prune.json").read_text())
    assert rec["after"]["layers"] == layers and rec["after"]["parameters"] == params_after
    model, _ = load_native(name)
    pruned = drop_layers(model, [int(x) for x in drop.split(",")])
    reloaded = auto.from_pretrained(out).eval()
    assert count_parameters(reloaded) == params_after
    tok = load_tokenizer(name)
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        a, b = pruned.eval()(**enc), reloaded(**enc)
    key = "logits" if hasattr(a, "logits") else "last_hidden_state"
    torch.testing.assert_close(getattr(b, key), getattr(a, key), rtol=1e-4, atol=1e-4)
    if auto is AutoModelForCausalLM:
        prompt = tok("The capital of France is", return_tensors="pt")
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        g1 = pruned.generate(**prompt, use_cache=True, **kw)
        assert torch.equal(g1, reloaded.generate(**prompt, use_cache=True, **kw))
        assert torch.equal(g1, pruned.generate(**prompt, use_cache=False, **kw))
