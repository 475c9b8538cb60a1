"""LRDI: teacher weights normalised to mean 1 per batch (default) vs raw sigmoid weights (normalize=false),
MLP, 1,500 steps, on the settings where the benchmark showed a collapse and on a few where it did not.
Prints (data, flips, seed, normalize, AUROC of value vs is_noisy, final test accuracy).

Run: python reports/scripts/lrdi_normalize.py   (about 3 minutes on an idle 2-core CPU)
"""
import tempfile, pandas as pd
from pathlib import Path
from valuekit.datasets import load_table, prepare
from valuekit.trainers.base import TrainConfig, train
from valuekit.analysis.mislabel import detection_metrics
rows=[]
with tempfile.TemporaryDirectory() as tmp:
    for name, noise, seed in (("mnist5k",0.4,1),("mnist5k",0.2,1),("mnist5k",0.4,0),("fashion-mnist",0.4,0),("digits",0.2,0),("digits",0.4,1)):
        kw={"noise":noise}
        if name=="fashion-mnist": kw.update(max_train=3000, test_fraction=0.05)
        p=prepare(name, Path(tmp)/f"{name}{noise}{seed}", seed=seed, **kw)
        tr=load_table(p["train"]); dv=load_table(p["dev"],like=tr,name="dev"); te=load_table(p["test"],like=tr,name="test")
        for norm in (True, False):
            cfg=TrainConfig(method="lrdi", steps=1500, seed=seed, device="cpu", progress=False, eval_every=1500, checkpoint_every=1500, log_every=500)
            r=train(tr,dv,te,out=Path(tmp)/f"r{name}{noise}{seed}{norm}", config=cfg, method_config={"normalize":norm})
            v=r.values().set_index("example_id").value.reindex(tr.ids).to_numpy()
            rows.append((name, noise, seed, norm, round(detection_metrics(v, tr.is_noisy)["auroc"],3), r.meta["final_metrics"]["test_acc"]))
            print(rows[-1], flush=True)
