"""Run pyDVL's Data-OOB and KNN-Shapley on arrays from an .npz (its own interpreter: numpy < 2).

usage: python pydvl_worker.py IN.npz OUT.npz SEED K TREES METHODS  (METHODS: comma-separated data-oob,knn-shapley)
Writes one array per method (values in training-row order, higher = more valuable).
"""

import sys

import numpy as np


def main(inp, out, seed, k, trees, methods):
    from pydvl.valuation import Dataset
    from pydvl.valuation.methods import DataOOBValuation, KNNShapleyValuation
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.neighbors import KNeighborsClassifier

    f = np.load(inp)
    x, y, dx, dy = f["x"], f["y"], f["dev_x"], f["dev_y"]
    train = Dataset(x, y)
    res = {}
    for m in methods.split(","):
        if m == "data-oob":
            model = RandomForestClassifier(n_estimators=trees, random_state=seed, n_jobs=1).fit(x, y)
            val = DataOOBValuation(model).fit(train)
        elif m == "knn-shapley":
            val = KNNShapleyValuation(KNeighborsClassifier(n_neighbors=k), test_data=Dataset(dx, dy),
                                      progress=False).fit(train)
        else:
            raise SystemExit(f"unknown method {m}")
        r = val.values()
        v = np.full(len(y), np.nan)
        v[np.asarray(r.indices, dtype=np.int64)] = np.asarray(r.values, dtype=np.float64)
        res[m.replace("-", "_")] = v
    np.savez(out, **res)


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], int(a[2]), int(a[3]), int(a[4]), a[5])
