"""DDS entropy bonus: 0.1 vs 0.5 on digits, mnist5k and fashion-mnist (3,000 rows) at 20 % and 40 % flips,
3 seeds, 1,500 steps, MLP; AUROC of value vs is_noisy and final test accuracy (mean and min over seeds).

Run: python reports/scripts/dds_entropy.py   (about 3 minutes on an idle 2-core CPU; prints the table)
"""
import tempfile, numpy as np, pandas as pd, torch
from pathlib import Path
from valuekit.datasets import load_table, prepare
from valuekit.trainers.base import TrainConfig, train
from valuekit.analysis.mislabel import detection_metrics
rows=[]
with tempfile.TemporaryDirectory() as tmp:
    for name in ("digits","mnist5k","fashion-mnist"):
        for setting in ({"noise":0.2},{"noise":0.4}):
            for seed in (0,1,2):
                kw=dict(setting); 
                if name=="fashion-mnist": kw.update(max_train=3000, test_fraction=0.05)
                p=prepare(name, Path(tmp)/f"{name}{setting['noise']}{seed}", seed=seed, **kw)
                tr=load_table(p["train"]); dv=load_table(p["dev"],like=tr,name="dev"); te=load_table(p["test"],like=tr,name="test")
                for ew in (0.1, 0.5):
                    cfg=TrainConfig(method="dds", steps=1500, seed=seed, device="cpu", progress=False, eval_every=1500, checkpoint_every=1500, log_every=500)
                    r=train(tr,dv,te,out=Path(tmp)/f"r{name}{setting['noise']}{seed}{ew}", config=cfg, method_config={"entropy_weight":ew})
                    v=r.values().set_index("example_id").value.reindex(tr.ids).to_numpy()
                    rows.append((name, setting["noise"], seed, ew, detection_metrics(v, tr.is_noisy)["auroc"], r.meta["final_metrics"]["test_acc"]))
df=pd.DataFrame(rows, columns=["data","noise","seed","ew","auroc","acc"])
print(df.groupby(["data","noise","ew"])[["auroc","acc"]].agg(["mean","min"]).round(3).to_string())
