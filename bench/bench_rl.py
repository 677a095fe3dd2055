"""RLJob learner on CPU: RL steps/s and rollout tokens/s, colocated vs disaggregated, and against TRL.

    .venv/bin/python bench/bench_rl.py [--steps 30] [--engines 1] [--trl-python /tmp/bench-trl-venv/bin/python]

Same tiny Llama (kubeforge.runtime.rl.tasks.weak_base_model), same task (single-digit addition, exact match),
same hyperparameters (GRPO, G=8, 16 prompts/step, clip 0.2, lr 2e-3, temperature 1, 4 new tokens):
1. colocated: the learner samples with its own weights (kubeforge.runtime.rl.policy.sample), then trains;
2. disaggregated: reference engine processes sample over HTTP; the learner pushes its weights to them
   after every step (weightSync http, intervalSteps 1) and checks their policy version around each batch;
3. TRL's GRPOTrainer on the same model, prompts, reward and hyperparameters, run with --trl-python (a venv
   with trl installed; never a dependency of kubeforge), when given.
Prints each one's steps/s, rollout tokens/s and mean reward of the last 10 steps, and ratios to colocated.
Figures depend on the machine; run on an idle one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "operator"))

HP = {"group_size": 8, "prompts_per_step": 16, "clip": 0.2, "lr": 2e-3, "temperature": 1.0, "max_new_tokens": 4}


def make_learner(model_dir: Path, placement: str, steps: int, engines: str | None = None):
    import torch.distributed as tdist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubeforge.api.common import OptimizerSpec
    from kubeforge.api.kinds import RLJobSpec
    from kubeforge.runtime import dist as kdist
    from kubeforge.runtime.rl import learner as L
    from kubeforge.runtime.rl import rewards
    from kubeforge.runtime.training import build_optimizer, build_scheduler

    if not tdist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000), RANK="0",
                          WORLD_SIZE="1")
        tdist.init_process_group("gloo")
    spec = RLJobSpec.model_validate({
        "model": {"uri": "s3://bench/model"}, "data": {"uri": "s3://bench/data"},
        "algorithm": {"name": "grpo", "groupSize": HP["group_size"], "promptsPerStep": HP["prompts_per_step"],
                      "clipRange": HP["clip"], "lr": HP["lr"], "steps": steps},
        "reward": {"verifiable": {"check": "exact_match"}},
        "rollout": {"engine": "reference", "placement": placement, "temperature": HP["temperature"],
                    "maxNewTokens": HP["max_new_tokens"]},
        "weightSync": {"method": "http", "intervalSteps": 1},
        "checkpoint": {"uri": "s3://bench/ckpt"}})
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    denv = kdist.DistEnv.from_env()
    choice = kdist.choose("ddp", "auto", False)
    opt_spec = OptimizerSpec(lr=HP["lr"], weight_decay=0.0, warmup_steps=0, schedule="constant", beta2=0.999)
    opt = build_optimizer(model, opt_spec, "cpu")
    learner = L.Learner(spec, model, opt, build_scheduler(opt, opt_spec, steps), tok,
                        rewards.build_scorer(spec.reward), None, denv, choice, tok.eos_token_id, tok.pad_token_id, 0)
    if engines:
        learner.use_engines(engines)
    learner.sync_weights(force=True)
    return learner


def run_kubeforge(model_dir: Path, placement: str, steps: int, engines: str | None = None) -> dict:
    from kubeforge.runtime.rl import learner as L
    from kubeforge.runtime.rl import tasks

    learner = make_learner(model_dir, placement, steps, engines)
    prompts = L.PromptSet([L.PromptRecord(r["prompt"], r["reference"]) for r in tasks.arithmetic_records()], 0)
    rollout_s = 0.0
    rollout_tokens = 0
    original = learner.rollout

    def timed_rollout(records):
        nonlocal rollout_s, rollout_tokens
        t = time.perf_counter()
        out = original(records)
        rollout_s += time.perf_counter() - t
        rollout_tokens += sum(len(c.completion_ids) for c in out)
        return out

    learner.rollout = timed_rollout
    curve = []
    t0 = time.perf_counter()
    for _ in range(steps):
        res = learner.step(prompts)
        learner.sync_weights()
        curve.append(sum(res.rewards) / max(1, len(res.rewards)))
    wall = time.perf_counter() - t0
    if learner.remote is not None:
        learner.remote.close()
    return {"steps_per_s": steps / wall, "rollout_tokens_per_s": rollout_tokens / max(rollout_s, 1e-9),
            "reward_last10": sum(curve[-10:]) / len(curve[-10:]), "reward_first": curve[0]}


TRL_SCRIPT = r"""
import json, sys, time
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer
model_dir, records, hp, steps, out = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
tok = AutoTokenizer.from_pretrained(model_dir)
tok.padding_side = "left"
bos = tok.bos_token
rows = [{"prompt": bos + r["prompt"], "reference": r["reference"]} for r in records] * (steps * 2)
def exact(completions, reference, **_):
    return [float(c.replace(tok.eos_token, "").strip() == r) for c, r in zip(completions, reference)]
cfg = GRPOConfig(output_dir=out, per_device_train_batch_size=hp["group_size"] * hp["prompts_per_step"],
                 num_generations=hp["group_size"], max_completion_length=hp["max_new_tokens"],
                 learning_rate=hp["lr"], epsilon=hp["clip"], beta=0.0, temperature=hp["temperature"],
                 max_steps=steps, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                 lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, loss_type="dapo",
                 scale_rewards="group", top_k=0, top_p=1.0)
rewards = []
class Log(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "reward" in logs: rewards.append(logs["reward"])
trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=exact, args=cfg,
                      train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[Log()])
t = time.perf_counter(); trainer.train(); wall = time.perf_counter() - t
print("TRL_RESULT " + json.dumps({"steps_per_s": steps / wall, "reward_last10": sum(rewards[-10:]) / max(1, len(rewards[-10:])),
                                  "reward_first": rewards[0] if rewards else None}))
"""


def run_trl(python: str, model_dir: Path, steps: int, tmp: Path) -> dict:
    from kubeforge.runtime.rl import tasks

    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.pop("PYTHONPATH", None)
    r = subprocess.run([python, "-c", TRL_SCRIPT, str(model_dir), json.dumps(tasks.arithmetic_records()),
                        json.dumps(HP), str(steps), str(tmp / "trl")], capture_output=True, text=True, env=env)
    for line in r.stdout.splitlines():
        if line.startswith("TRL_RESULT "):
            return json.loads(line.removeprefix("TRL_RESULT "))
    raise RuntimeError(f"TRL run failed:\n{r.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--engines", type=int, default=1)
    ap.add_argument("--trl-python", default=None)
    args = ap.parse_args()
    import torch

    from kubeforge.runtime.rl import tasks
    from kubeforge.runtime.serve.testing import engine_proc

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        model_dir = tasks.weak_base_model(tmp / "base")
        results = {"colocated": run_kubeforge(model_dir, "colocated", args.steps)}
        procs = [engine_proc(str(model_dir), name="policy") for _ in range(args.engines)]
        try:
            for p in procs:
                p.wait()
            urls = ",".join(p.url for p in procs)
            results[f"disaggregated x{args.engines}"] = run_kubeforge(model_dir, "disaggregated", args.steps, urls)
        finally:
            for p in procs:
                p.stop()
        if args.trl_python:
            results["TRL GRPOTrainer"] = run_trl(args.trl_python, model_dir, args.steps, tmp)
    base = results["colocated"]
    print(f"{'run':<22} {'steps/s':>8} {'rollout tok/s':>14} {'reward 1st':>10} {'reward last10':>13} "
          f"{'steps/s vs colocated':>21}")
    for name, r in results.items():
        tps = r.get("rollout_tokens_per_s")
        print(f"{name:<22} {r['steps_per_s']:>8.2f} {tps if tps is None else round(tps, 1)!s:>14} "
              f"{r['reward_first'] if r['reward_first'] is None else round(r['reward_first'], 3)!s:>10} "
              f"{r['reward_last10']:>13.3f} {r['steps_per_s'] / base['steps_per_s']:>21.2f}")


if __name__ == "__main__":
    main()
