"""Does Half Fine-Tuning forget less? Fine-tune the tiny vanilla model further on new data, with
and without HFT, and measure how much of what it knew it keeps.

The vanilla model (``configs/finetune_offside_tiny.yaml``) knows an OFFSIDE release: its world
facts and its retained facts. Each run fine-tunes it on new data (default: 20 fictional transfer
facts, ``configs/data/tiny_facts.jsonl``) through ``offside-jax finetune``'s own code
(``run_finetune``, AdamW), once per mode and seed, and reports the answer probability
(``exp(-mean answer NLL)`` per record, then the mean over records; the new data: over all its
answer tokens) of the world facts, the retained facts (text twins) and the new data, before and
after:

    offside-jax make-data --players 3 --out runs/offside_tiny
    offside-jax finetune --config configs/finetune_offside_tiny.yaml
    python scripts/hft_forgetting.py --release runs/offside_tiny --model runs/finetune_offside_tiny/model \\
        --out runs/hft_forgetting.json

Extra ``key=value`` arguments override the fine-tune's config (``FinetuneConfig`` keys, e.g.
``optim.lr=1e-3 train.steps=200``).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def measure(model, tokenizer, hf_config, release: str, sets: dict, new_data: str) -> dict[str, float]:
    from offside_jax.data import batches as release_data
    from offside_jax.train import losses, sft_data
    from offside_jax.unlearn import probe

    out = {}
    for name, examples in sets.items():
        encoder = release_data.fit_shape(release_data.make_encoder(tokenizer, hf_config, image_root=release), examples)
        out[name] = float(np.mean(probe.answer_probabilities(model, examples, encoder, batch_size=16)))
    ids, attention, loss_mask = sft_data.encode_all(tokenizer, sft_data.read_chat_jsonl(new_data), 48, new_data)
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(attention), "loss_mask": jnp.asarray(loss_mask)}
    loss_sum, weight, _ = losses.answer_nll(model, batch, None, None)
    out["new_data"] = float(np.exp(-float(loss_sum) / float(weight)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--release", required=True, help="the release the vanilla model learned (make-data)")
    parser.add_argument("--model", required=True, help="the vanilla model (finetune's exported model directory)")
    parser.add_argument("--new-data", default=str(ROOT / "configs" / "data" / "tiny_facts.jsonl"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rounds", type=int, default=10, help="HFT: optimizer updates per round")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", help="write the results here (JSON)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the fine-tune's config")
    args = parser.parse_args(argv)

    from offside_jax.config import FinetuneConfig, load_config
    from offside_jax.data import batches as release_data
    from offside_jax.models import hf
    from offside_jax.models.loader import auto_tokenizer
    from offside_jax.train.finetune import run_finetune

    tokenizer = auto_tokenizer(args.model)
    hf_config = hf.load_hf_config(args.model)
    sets = {name: release_data.release_examples(args.release, setting, [split], "text", vision=False)
            for name, setting, split in (("world_facts", "complete", "world_facts"), ("retain", "pure_text", "retain"))}
    vanilla = hf.load_pretrained(args.model)
    before = measure(vanilla, tokenizer, hf_config, args.release, sets, args.new_data)
    print("before:", json.dumps(before))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for mode in ("full", "hft"):
                overrides = [f"output_dir={tmp}/{mode}-{seed}", f"seed={seed}", "model.source=hf", f"model.path={args.model}",
                             f"data.train_file={args.new_data}", "data.eval_file=null", "data.max_length=48",
                             "data.batch_size=8", "mesh.fsdp=1", f"train.steps={args.steps}", "train.eval_every=0",
                             f"optim.lr={args.lr}", "optim.schedule=constant", "optim.warmup_steps=0",
                             "optim.weight_decay=0.01", "log.progress=false", "log.tensorboard=false",
                             "checkpoint.every=0", "export_merged=false",
                             f"train.half_finetune.enabled={mode == 'hft'}", f"train.half_finetune.rounds={args.rounds}",
                             f"train.half_finetune.seed={seed}", *args.overrides]
                result = run_finetune(load_config(None, overrides, FinetuneConfig))
                after = measure(result.model(), tokenizer, hf_config, args.release, sets, args.new_data)
                runs.append({"mode": mode, "seed": seed, "after": after})
                print(f"{mode} seed {seed}:", json.dumps(after))
    summary = {}
    for mode in ("full", "hft"):
        mine = [r["after"] for r in runs if r["mode"] == mode]
        summary[mode] = {k: {"mean": float(np.mean([m[k] for m in mine])), "std": float(np.std([m[k] for m in mine]))}
                         for k in before}
    print("\n| measure | before | full FT after | HFT after |\n|---|---|---|---|")
    for k in before:
        print(f"| {k} | {before[k]:.3f} | {summary['full'][k]['mean']:.3f} ± {summary['full'][k]['std']:.3f} | "
              f"{summary['hft'][k]['mean']:.3f} ± {summary['hft'][k]['std']:.3f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "before": before, "runs": runs, "summary": summary},
                                             indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
