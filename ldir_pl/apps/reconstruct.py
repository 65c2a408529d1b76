"""``ldir-reconstruct``: reconstruct a data set from simulated or measured sinograms with one or more methods.

    ldir-reconstruct data=dicom data.root=DIR physics.num_views=23 sampler=ldir prior.path=OUT/prior output_dir=RES

Writes ``metrics.csv`` (per image and method), ``summary.json`` (per method: psnr, ssim, seconds_per_image,
peak_mem_mb, n), PNG panels and the reconstructions; returns the main method's mean PSNR for sweeps.
With ``-m`` each job writes into its own folder and the sweep folder gets ``table.md``,
``sweep_summary.json`` and ``psnr_vs_views.png`` over all jobs so far.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.loggers import WandbLogger

from ldir_pl.apps.cli import user_errors
from ldir_pl.apps.conf_dir import CONF_DIR
from ldir_pl.apps.predict_module import LDIRModule
from ldir_pl.apps.prediction_writer import ReconstructionWriter
from ldir_pl.apps.report import format_table, summarize, write_csv, write_json
from ldir_pl.apps.sampler_configs import compose_sampler
from ldir_pl.apps.sweep_report import write_sweep_report

log = logging.getLogger(__name__)


def sampler_config(name: str) -> dict:
    """``conf/sampler/<name>.yaml`` composed by Hydra (so its own ``defaults`` apply), unresolved."""
    return OmegaConf.to_container(compose_sampler(name).sampler, resolve=False)


def build_methods(cfg: DictConfig) -> tuple[dict, str]:
    """(name -> method, the main method's name): the named ``baselines`` (files of ``conf/sampler/``) first,
    the main ``sampler`` last, so panels read left to right from the baselines to it. A baseline's config is
    placed in this run's config before it is built, so ``${prior.path}``, ``${seed}`` and ``${tv}`` resolve
    against this run (its physics, its data size)."""
    methods = {}
    for name in cfg.get("baselines") or []:
        root = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
        root._baseline = sampler_config(name)
        method = instantiate(root._baseline)
        methods[method.name] = method
    main = instantiate(cfg.sampler)
    methods.pop(main.name, None)
    methods[main.name] = main
    return methods, main.name


def collect(output_dir: Path, world_size: int) -> list[dict]:
    rows, seen = [], set()
    for rank in range(world_size):
        part = output_dir / "parts" / f"rank{rank}.jsonl"
        for line in part.read_text().splitlines():
            row = json.loads(line)
            key = (row["id"], row["method"])
            if key not in seen:  # distributed samplers may repeat an image to even out shards
                seen.add(key)
                rows.append(row)
    return sorted(rows, key=lambda r: (r["method"], r["id"]))


def run(cfg: DictConfig) -> dict[str, dict]:
    """Reconstruct ``cfg.data`` with the configured methods; returns the summary (rank 0)."""
    pl.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    physics = instantiate(cfg.physics)
    datamodule = instantiate(cfg.data)
    datamodule.attach_physics(physics)
    methods, main_name = build_methods(cfg)  # priors load and are checked here, before any sampling
    module = LDIRModule(methods, physics)
    logger = instantiate(cfg.logger) if cfg.get("logger") and cfg.logger.get("_target_") else False
    writer = ReconstructionWriter(out, cfg.num_panels, cfg.save_reconstructions)
    trainer = pl.Trainer(**cfg.trainer, logger=logger, callbacks=[writer], inference_mode=False,
                         enable_checkpointing=False, enable_model_summary=False)
    if cfg.recon.volume:  # one volume per batch: NIfTI out, orthogonal panels, per-volume metrics
        trainer.predict(module, dataloaders=datamodule.volume_dataloader(), return_predictions=False)
    else:
        trainer.predict(module, datamodule=datamodule, return_predictions=False)
    trainer.strategy.barrier()
    if trainer.global_rank != 0:
        return {}
    rows = collect(out, trainer.world_size)
    summary = summarize(rows)
    summary = {m: summary[m] for m in methods if m in summary}  # baselines first, the main method last
    write_csv(rows, out / "metrics.csv")
    write_json(summary, out / "summary.json")
    write_json({"physics": physics.describe(), "methods": list(methods), "main_method": main_name,
                "world_size": trainer.world_size,
                "torch_threads": torch.get_num_threads()}, out / "run_info.json")
    title = f"{type(datamodule).__name__}: {physics.label}"
    print(format_table(summary, title))
    panels = f", panels in {out / 'panels'}/" if any(out.glob("panels/*.png")) else ""
    print(f"per image: {out / 'metrics.csv'}; per method: {out / 'summary.json'}{panels}", flush=True)
    if isinstance(logger, WandbLogger):
        log_to_wandb(logger, summary, rows, out)
    return summary


def log_to_wandb(logger, summary: dict, rows: list[dict], out: Path) -> None:
    import wandb

    logger.log_metrics({f"{m}/{k}": v for m, s in summary.items() for k, v in s.items() if v is not None})
    table = wandb.Table(columns=["id", "method", "psnr", "ssim", "panel"])
    panels = {p.stem: p for p in (out / "panels").glob("*.png")}
    for r in rows:
        panel = panels.get(r["id"].replace("/", "_"))
        table.add_data(r["id"], r["method"], r["psnr"], r["ssim"], wandb.Image(str(panel)) if panel else None)
    logger.experiment.log({"reconstructions": table})


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="reconstruct")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    torch.set_float32_matmul_precision("high")
    hydra_cfg = HydraConfig.get()
    sweeping = hydra_cfg.mode == RunMode.MULTIRUN
    if sweeping:  # every job writes into its own folder; the sweep folder gets the joint table and plot
        with open_dict(cfg):
            cfg.output_dir = hydra_cfg.runtime.output_dir
    with user_errors("ldir-reconstruct"):
        summary = run(cfg)
    if sweeping and summary and cfg.physics.get("num_views") is not None:  # the joint table is over views
        write_sweep_report(Path(hydra_cfg.sweep.dir))
    main_psnr = summary.get(str(cfg.sampler.name), {}).get("psnr")  # what a sweep optimises
    return float("nan") if main_psnr is None else float(main_psnr)


if __name__ == "__main__":
    main()
