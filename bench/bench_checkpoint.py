"""Checkpoint save and restore throughput to S3, next to raw boto3 moving the same bytes.

    .venv/bin/python bench/bench_checkpoint.py [--hidden 512] [--layers 6] [--repeat 2]

A Llama of ~75 MB (fp32) with AdamW state (checkpoint ~225 MB) in one process (gloo, world 1):
- runtime save: DCP write to local disk + sha256 + parallel multipart upload + manifest commit
  (kubeforge.runtime.checkpointing.Checkpointer.save + wait), and its parts;
- runtime restore: list + validate + parallel download + sha256 verify + DCP load;
- storage only: CheckpointStore.save_dir / download of the same files;
- raw boto3: `client.upload_file` / `download_file` of the same files with boto3's default TransferConfig,
  files one after another (what a hand-written loop does) and all at once in a thread pool.

S3 is a moto server on loopback (in-memory); figures show the client side's overhead, not a real store's.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "operator"))

from kubeforge.runtime import localrun  # noqa: E402


def mbps(nbytes: int, seconds: float) -> str:
    return f"{nbytes / 1e6 / seconds:8.1f} MB/s ({seconds:6.2f}s)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    import boto3.s3.transfer
    import torch
    import torch.distributed as dist
    from moto.server import ThreadedMotoServer

    from kubeforge.runtime.checkpointing import AppState, Checkpointer
    from kubeforge.runtime.dist import DistEnv, choose
    from kubeforge.runtime.tinymodel import build_model, tiny_llama_config
    from kubeforge.storage import CheckpointStore, make_client
    from kubeforge.storage import s3 as s3mod

    cfg_t = boto3.s3.transfer.TransferConfig()  # boto3's defaults
    port = localrun.free_port()
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    srv.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "b", "AWS_SECRET_ACCESS_KEY": "b"}
    os.environ.update(env)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(localrun.free_port()), "RANK": "0",
                       "WORLD_SIZE": "1"})
    dist.init_process_group("gloo")
    client = make_client(env=env, max_pool_connections=64)
    client.create_bucket(Bucket="bench")

    cfg = tiny_llama_config(hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875),
                            num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8)
    model = build_model(cfg)
    nparams = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(input_ids=torch.randint(0, 256, (1, 16))).logits.sum().backward()
    opt.step()  # creates the optimizer state
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    app = AppState(model, opt, sched)
    app.train = {"step": 1}
    denv = DistEnv(0, 1, 0, 1, 0)
    choice = choose("ddp", "auto", cuda_available=False)
    print(f"model: llama hidden={args.hidden} layers={args.layers}, {nparams / 1e6:.1f}M parameters "
          f"= {nparams * 4 / 1e6:.0f} MB fp32; checkpoint = model + AdamW state; cores: {os.cpu_count()}")

    with tempfile.TemporaryDirectory(prefix="kf-ckpt-bench-") as td:
        tmp = Path(td)
        results: dict[str, list[float]] = {}

        def record(name: str, seconds: float) -> None:
            results.setdefault(name, []).append(seconds)

        size = 0
        for r in range(args.repeat):
            store = CheckpointStore(f"s3://bench/run{r}", client=client)
            ck = Checkpointer(store, tmp / f"work{r}", denv, choice, keep=3)
            # runtime save, and its DCP part alone
            t0 = time.perf_counter()
            import torch.distributed.checkpoint as dcp

            dcp_dir = tmp / f"dcp{r}"
            dcp.save({"app": app}, checkpoint_id=str(dcp_dir))
            record("dcp_local_write", time.perf_counter() - t0)
            size = sum(p.stat().st_size for p in dcp_dir.iterdir())
            t0 = time.perf_counter()
            ck.save(app, step=1, tokens=0)
            ck.wait()
            record("runtime_save", time.perf_counter() - t0)
            # runtime restore
            t0 = time.perf_counter()
            train = ck.restore(app)
            record("runtime_restore", time.perf_counter() - t0)
            assert train is not None and train["step"] == 1
            # storage only
            t0 = time.perf_counter()
            store2 = CheckpointStore(f"s3://bench/store{r}", client=client)
            store2.save_dir(dcp_dir, 1)
            record("store_upload", time.perf_counter() - t0)
            t0 = time.perf_counter()
            store2.download(1, tmp / f"down{r}")
            record("store_download", time.perf_counter() - t0)
            t0 = time.perf_counter()
            for p in dcp_dir.iterdir():
                s3mod.sha256_file(p)
            record("sha256_only", time.perf_counter() - t0)
            # raw boto3, default TransferConfig, files one by one
            files = sorted(dcp_dir.iterdir())
            t0 = time.perf_counter()
            for p in files:
                client.upload_file(str(p), "bench", f"raw{r}/{p.name}")
            record("raw_upload_serial", time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = tmp / f"raw{r}"
            out.mkdir()
            for p in files:
                client.download_file("bench", f"raw{r}/{p.name}", str(out / p.name))
            record("raw_download_serial", time.perf_counter() - t0)
            # raw boto3, all files at once
            t0 = time.perf_counter()
            with ThreadPoolExecutor(len(files)) as pool:
                list(pool.map(lambda p, r=r: client.upload_file(str(p), "bench", f"rawp{r}/{p.name}",
                                                                Config=cfg_t), files))
            record("raw_upload_parallel", time.perf_counter() - t0)
            shutil.rmtree(out)
            out.mkdir()
            t0 = time.perf_counter()
            with ThreadPoolExecutor(len(files)) as pool:
                list(pool.map(lambda p, r=r, out=out: client.download_file(
                    "bench", f"rawp{r}/{p.name}", str(out / p.name), Config=cfg_t), files))
            record("raw_download_parallel", time.perf_counter() - t0)
            for d in (dcp_dir, out, tmp / f"down{r}"):
                shutil.rmtree(d, ignore_errors=True)

        best = {k: min(v) for k, v in results.items()}
        print(f"checkpoint: {size / 1e6:.0f} MB in {len(files)} files; best of {args.repeat}")
        print(f"  runtime save   (DCP write + sha256 + upload + commit) {mbps(size, best['runtime_save'])}")
        print(f"    of which DCP write to local disk                   {mbps(size, best['dcp_local_write'])}")
        print(f"    of which sha256 of the files                       {mbps(size, best['sha256_only'])}")
        print(f"  runtime restore (list + download + verify + DCP load) {mbps(size, best['runtime_restore'])}")
        print(f"  CheckpointStore upload (sha256 + upload + commit)    {mbps(size, best['store_upload'])}")
        print(f"  CheckpointStore download (+ sha256 verify)           {mbps(size, best['store_download'])}")
        print(f"  raw boto3 upload_file, files in turn                 {mbps(size, best['raw_upload_serial'])}")
        print(f"  raw boto3 upload_file, files in parallel             {mbps(size, best['raw_upload_parallel'])}")
        print(f"  raw boto3 download_file, files in turn               {mbps(size, best['raw_download_serial'])}")
        print(f"  raw boto3 download_file, files in parallel           {mbps(size, best['raw_download_parallel'])}")
    dist.destroy_process_group()
    srv.stop()


if __name__ == "__main__":
    main()
