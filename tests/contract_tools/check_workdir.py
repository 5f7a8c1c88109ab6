# A copy of ../shared/tools/check_workdir.py (the project's contract checks), used by the tests only where the shared
# folder is not beside this checkout; tests/contract.py prefers the shared original.
"""Reads a jft work directory with plain orbax (no jft import), as any user's tool would, and prints facts
about its latest (or a given) checkpoint as JSON. If this cannot find the params, neither can they.

usage: ckpt.py WORKDIR [STEP] [--dump NPZ]  -> {"steps": [...], "latest": N, "params_sha256": "...", "n_params": N,
                                      "zeros": N, "paths": {path: [shape, zeros, size]}}
"""
import hashlib, json, os, sys

import numpy as np
import orbax.checkpoint as ocp


def flatten(tree, prefix=""):
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}/{k}" if prefix else str(k)))
    else:
        out[prefix] = np.asarray(tree)
    return out


def find_params(tree):
    if isinstance(tree, dict):
        if "params" in tree and isinstance(tree["params"], dict):
            return tree["params"]
        for v in tree.values():
            found = find_params(v)
            if found is not None:
                return found
    return None


def main(workdir, step=None, dump=None):
    root = os.path.join(workdir, "checkpoints")
    mngr = ocp.CheckpointManager(root)
    steps = sorted(mngr.all_steps())
    if not steps:
        print(json.dumps({"steps": []}))
        return
    latest = steps[-1] if step is None else (steps[0] if step == "first" else int(step))
    step_dir = os.path.join(root, str(latest))
    items = [d for d in os.listdir(step_dir) if os.path.isdir(os.path.join(step_dir, d))]
    restored = None
    for item in items:
        try:
            restored = ocp.PyTreeCheckpointer().restore(os.path.join(step_dir, item))
        except Exception:
            continue
        if find_params(restored) is not None:
            break
    params = find_params(restored) if restored is not None else None
    if params is None:
        print(json.dumps({"steps": steps, "latest": latest, "error": "no params found", "items": items}))
        return
    flat = flatten(params)
    if dump:
        np.savez(dump, **{k.replace("/", "|"): v for k, v in flat.items()})
    h = hashlib.sha256()
    for k in sorted(flat):
        h.update(k.encode())
        h.update(np.ascontiguousarray(flat[k]).tobytes())
    print(json.dumps({
        "steps": steps, "latest": latest, "params_sha256": h.hexdigest(),
        "n_params": int(sum(v.size for v in flat.values())),
        "zeros": int(sum(int((v == 0).sum()) for v in flat.values())),
        "paths": {k: [list(v.shape), int((v == 0).sum()), int(v.size)] for k, v in flat.items()},
    }))


if __name__ == "__main__":
    args = sys.argv[1:]
    dump = None
    if "--dump" in args:
        i = args.index("--dump")
        dump = args[i + 1]
        del args[i:i + 2]
    main(args[0], args[1] if len(args) > 1 else None, dump)
