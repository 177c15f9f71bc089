"""merge_lora streams: its memory is one block of the DiT (plus the LoRA), not the model.

Measured in a fresh process on a ~120 MB Z-Image DiT of four blocks (each about a quarter of the file):
the peak resident memory (VmRSS: allocations and mapped file pages alike, since a weight read from a
memory-mapped file stays resident while it lives) above the same process's value before the merge. A
merge that loads the DiT whole needs at least the output's size there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from tsumugi.testing.tiny_models import build_random, save_component, tiny_config

SRC = Path(__file__).resolve().parents[2] / "src"

CONFIG = {**tiny_config("zimage_dit"), "dim": 768, "n_heads": 6, "n_kv_heads": 6, "axes_dims": [32, 48, 48]}

PROBE = """
import json, sys
from tsumugi import merge_lora
from tsumugi.testing.host_memory import PeakSampler

dit, lora, warm_out, out = sys.argv[1:]
merge_lora.main(["--dit", dit, "--lora_weight", lora, "--save_merged_model", warm_out, "--device", "cpu"])
probe = PeakSampler("VmRSS")  # after a first merge: every import and one-time table is in place
code = merge_lora.main(["--dit", dit, "--lora_weight", lora, "--save_merged_model", out, "--device", "cpu"])
print(json.dumps({"code": code, "start": probe.start, "peak": probe.stop()}))
"""


def test_merge_lora_peak_rss_is_one_block_not_the_model(tmp_path: Path) -> None:
    model = build_random("zimage_dit", CONFIG)
    dit = save_component(model, "zimage_dit", "comfy", tmp_path / "dit.safetensors")
    target = model.layers[0].attention.to_q
    generator = torch.Generator().manual_seed(0)
    save_file({
        "lora_unet_layers_0_attention_to_q.lora_down.weight": torch.randn(4, target.in_features, generator=generator),
        "lora_unet_layers_0_attention_to_q.lora_up.weight": torch.randn(target.out_features, 4, generator=generator),
    }, str(tmp_path / "lora.safetensors"))
    del model

    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(dit), str(tmp_path / "lora.safetensors"), str(tmp_path / "warm.safetensors"),
         str(tmp_path / "merged.safetensors")],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] == 0
    output = (tmp_path / "merged.safetensors").stat().st_size
    assert output > 100e6
    used = (result["peak"] - result["start"]) * 1024
    assert used < 0.6 * output, f"merge used {used / 1e6:.0f} MB above its start for a {output / 1e6:.0f} MB output"
