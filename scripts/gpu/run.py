#!/usr/bin/env python3
"""The GPU check's orchestrator (started by scripts/gpu/run.sh, which unpacks what the pack carries).

    python3 scripts/gpu/run.py --out DIR [--device auto|cuda|cpu] [--tiny] [--budget SECONDS]
                               [--build-dir DIR | --addon FILE] [--sections env,build,model,parity,train,checkpointing,sample]

Runs each section in a child process with a time limit taken from one global budget, and rewrites
DIR/gpu-run.json and DIR/gpu-run.md after every section, so a run cut short still leaves every
result it got. The children's output goes to DIR/run.log.

Sections:
  env     the machine: GPU (nvidia-smi), Python torch/diffusers/transformers, Node, LibTorch identity
  build   the addon compiled against this machine's LibTorch (scripts/gpu/build-addon.sh), then
          loaded once (info()); skipped with --addon or when no --build-dir is given on a CPU
  model   a random-weight SD1.5 folder made on the device (scripts/gpu/make_model.py; --tiny: a
          reduced-width one); runs while the addon builds
  parity  scripts/gpu/parity.js on the device in float32, float16 and bfloat16
  train   bench/train-step.js: 2 instance + 2 class images at 512 px, bf16 mixed precision, against
          diffusers' train_custom_diffusion-equivalent step in the same process pair
  checkpointing  bench/checkpointing.js on the same batch: the memory the training steps take above
          the loaded model (CUDA allocator peak) with and without gradient checkpointing, and the
          step-time ratio
  sample  bench/sample-step.js: 50 DDIM steps with guidance, batch 1, float16, against
          StableDiffusionPipeline; concept switch; mixed-concept batch throughput
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
FIXTURE = os.path.join(ROOT, "test", "fixtures", "parity", "sd1", "model")

TRAIN_TARGET_RATIO = 0.8
TRAIN_TARGET_PEAK_GB = 16.0
SAMPLE_BATCH_TARGET_GB = 8.0


def now() -> float:
    return time.monotonic()


class Run:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.t0 = now()
        self.deadline = self.t0 + a.budget
        self.out = os.path.abspath(a.out)
        os.makedirs(self.out, exist_ok=True)
        self.log_path = os.path.join(self.out, "run.log")
        self.log = open(self.log_path, "a", encoding="utf-8")
        self.work = os.path.abspath(a.work)
        os.makedirs(self.work, exist_ok=True)
        self.env = dict(os.environ)
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.results = {
            "schema": 1,
            "what": "custom-diffusion GPU check: parity on the device, training and sampling benchmarks against diffusers side by side",
            "startedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "status": "running",
            "mode": {"device": a.device, "tiny": a.tiny, "budgetSeconds": a.budget},
            "git": self.git(),
            "sections": {},
        }
        self.write()

    # ------------------------------------------------------------------ helpers
    def git(self) -> dict:
        info = {}
        for k, cmd in (("commit", ["git", "rev-parse", "HEAD"]), ("dirty", ["git", "status", "--porcelain", "--untracked-files=no"])):
            try:
                r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=10)
                info[k] = r.stdout.strip() if k == "commit" else bool(r.stdout.strip())
            except Exception:  # noqa: BLE001 - no git on the machine is fine
                pass
        pack = os.path.join(ROOT, "gpu-pack", "MANIFEST.json")
        if os.path.isfile(pack):
            try:
                with open(pack, encoding="utf-8") as f:
                    info["pack"] = json.load(f)
            except Exception:  # noqa: BLE001
                pass
        return info

    def say(self, msg: str) -> None:
        line = f"[{now() - self.t0:6.1f}s] {msg}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def remaining(self) -> float:
        return self.deadline - now()

    def write(self) -> None:
        self.results["elapsedSeconds"] = round(now() - self.t0, 1)
        path = os.path.join(self.out, "gpu-run.json")
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.results, f, indent=2, default=str)
            f.write("\n")
        os.replace(tmp, path)
        md = os.path.join(self.out, "gpu-run.md")
        with open(md + ".tmp", "w", encoding="utf-8") as f:
            f.write(render_markdown(self.results))
        os.replace(md + ".tmp", md)

    def section(self, name: str, status: str, seconds: float, data=None, **extra) -> dict:
        s = {"status": status, "seconds": round(seconds, 1), **extra}
        if data is not None:
            s["data"] = data
        self.results["sections"][name] = s
        self.write()
        self.say(f"{name}: {status} ({seconds:.1f}s){' - ' + extra['error'] if 'error' in extra else ''}")
        return s

    def skip(self, name: str, why: str) -> dict:
        return self.section(name, "skipped", 0.0, reason=why)

    def budget_for(self, cap: float, need: float) -> float | None:
        left = self.remaining() - 5
        if left < need:
            return None
        return min(cap, left)

    def start(self, cmd: list[str], env: dict | None = None) -> subprocess.Popen:
        self.say("$ " + " ".join(cmd))
        return subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env or self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def finish(self, p: subprocess.Popen, timeout: float) -> tuple[int | None, str]:
        """Waits for a child; kills its whole process group at the timeout. Returns (code or None, output)."""
        out_chunks: list[str] = []

        def pump():
            for line in p.stdout:  # type: ignore[union-attr]
                out_chunks.append(line)
                self.log.write(line)
                self.log.flush()

        th = threading.Thread(target=pump, daemon=True)
        th.start()
        try:
            code = p.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
            code = None
        th.join(timeout=5)
        return code, "".join(out_chunks)

    def call(self, cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int | None, str]:
        return self.finish(self.start(cmd, env), timeout)

    # ------------------------------------------------------------------ sections
    def env_section(self) -> None:
        t = now()
        data: dict = {}
        smi = shutil.which("nvidia-smi")
        if smi:
            r = subprocess.run(
                [smi, "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            data["nvidiaSmi"] = r.stdout.strip() or r.stderr.strip()
        code, out = self.call(
            [
                sys.executable,
                "-c",
                "import json, sys, platform\n"
                "d = {'python': sys.version.split()[0], 'executable': sys.executable, 'platform': platform.platform()}\n"
                "try:\n"
                "    import torch\n"
                "    d['torch'] = torch.__version__; d['cuda'] = torch.cuda.is_available(); d['torchCuda'] = torch.version.cuda\n"
                "    if torch.cuda.is_available():\n"
                "        p = torch.cuda.get_device_properties(0)\n"
                "        d['gpu'] = p.name; d['gpuMemoryGB'] = round(p.total_memory / 1e9, 1); d['capability'] = f'{p.major}.{p.minor}'\n"
                "except Exception as e: d['torchError'] = repr(e)\n"
                "for m in ('diffusers', 'transformers', 'accelerate', 'safetensors'):\n"
                "    try: d[m] = __import__(m).__version__\n"
                "    except Exception as e: d[m + 'Error'] = repr(e)[:200]\n"
                "print('JSON ' + json.dumps(d))\n",
            ],
            timeout=120,
        )
        data.update(last_json(out, prefix="JSON ") or {"error": out[-2000:]})
        code2, out2 = self.call(["node", "-e", "console.log('JSON ' + JSON.stringify({node: process.version, arch: process.arch}))"], 30)
        data.update(last_json(out2, prefix="JSON ") or {"nodeError": out2[-500:]})
        code3, out3 = self.call(["node", "scripts/find-libtorch.js", "--json"], 60)
        lt = last_json(out3, whole=True)
        if lt:
            data["libtorch"] = {k: lt.get(k) for k in ("root", "source", "version", "cuda", "identity")}
        else:
            data["libtorchError"] = out3[-1000:]
        self.results["machine"] = data
        cuda = bool(data.get("cuda"))
        if self.a.device == "auto":
            self.a.device = "cuda" if cuda else "cpu"
        self.results["mode"]["device"] = self.a.device
        self.section("env", "ok" if code == 0 and code2 == 0 else "error", now() - t, data)

    def start_model(self):
        """Starts the model generation (it runs while the addon builds). Returns a finisher."""
        t = now()
        target = os.path.join(self.work, "sd15-random" if not self.a.tiny else "sd15-tiny-random")
        limit = self.budget_for(180, 20)
        if limit is None:
            self.skip("model", "budget")
            return lambda: None
        dev = "cuda" if self.a.device.startswith("cuda") else "cpu"
        p = self.start(
            [sys.executable, os.path.join(HERE, "make_model.py"), target, "--size", "tiny" if self.a.tiny else "sd15", "--device", dev]
        )
        end = now() + limit

        def done():
            code, out = self.finish(p, end - now())
            info = last_json(out)
            if code == 0 and info:
                self.model = target
                self.section("model", "ok", now() - t, info)
            else:
                self.section("model", "timeout" if code is None else "error", now() - t, error=tail(out))

        return done

    INFO_JS = (
        "const n = require('./lib/native'); const a = n.loadAddon(); const i = a.binding.info();"
        "console.log('JSON ' + JSON.stringify({file: a.file, identity: i.libtorchIdentity, builtWithCuda: i.builtWithCuda,"
        " cudaAvailable: i.cudaAvailable, cudnnAvailable: i.cudnnAvailable, devices: i.cudaDevices,"
        " cudaMemoryStats: typeof a.binding.cudaMemoryStats === 'function'}))"
    )

    def probe_addon(self, addon: str | None) -> tuple[dict | None, str]:
        """Loads an addon (None: the loader's own choice) in a child; returns (its info() or None, output)."""
        env = dict(self.env)
        env.pop("CUSTOM_DIFFUSION_ADDON", None)
        if addon:
            env["CUSTOM_DIFFUSION_ADDON"] = os.path.abspath(addon)
        code, out = self.call(["node", "-e", self.INFO_JS], 60, env)
        info = last_json(out, prefix="JSON ")
        return (info if code == 0 and info else None), out

    def usable(self, info: dict | None) -> bool:
        return bool(info) and (not self.a.device.startswith("cuda") or bool(info.get("cudaAvailable")))

    def prebuilt_for_this_machine(self) -> str | None:
        """The pack's prebuilt addon when it was built for exactly this machine's LibTorch."""
        f = self.a.prebuilt_addon
        if not f or not os.path.isfile(f):
            return None
        try:
            with open(f[: -len(".node")] + ".libtorch.json", encoding="utf-8") as fh:
                built_for = json.load(fh).get("identity")
        except Exception:  # noqa: BLE001
            built_for = None
        here = ((self.results.get("machine") or {}).get("libtorch") or {}).get("identity")
        self.results["mode"]["prebuilt"] = {"file": f, "builtFor": built_for, "machine": here}
        return f if built_for and built_for == here else None

    def start_build(self, cap: float):
        """Starts compiling the addon (it runs while the model is made, and parity on a prebuilt addon).
        Returns a finisher that records the build section and returns the built addon's path or None."""
        t = now()
        limit = self.budget_for(cap, 60)
        if limit is None:
            self.skip("build", "budget")
            return lambda: None
        self.say(f"compiling the addon ({self.a.jobs} jobs, at most {limit:.0f}s)")
        build = os.path.abspath(self.a.build_dir)
        p = self.start(["bash", os.path.join(HERE, "build-addon.sh"), build, str(self.a.jobs)])
        end = now() + limit

        def done():
            code, out = self.finish(p, end - now())
            addon = os.path.join(build, "custom_diffusion.node")
            if code != 0 or not os.path.isfile(addon):
                self.section("build", "timeout" if code is None else "error", now() - t, error=tail(out))
                return None
            data = {"from": "source", "addon": addon, "jobs": self.a.jobs, "compileSeconds": round(now() - t, 1)}
            info, pout = self.probe_addon(addon)
            data["loaded"] = info
            if not self.usable(info):
                self.section("build", "error", now() - t, data, error="the built addon does not load or sees no CUDA: " + tail(pout))
                return None
            self.section("build", "ok", now() - t, data)
            return addon

        return done

    def use_addon(self, addon: str | None) -> None:
        if addon:
            self.env["CUSTOM_DIFFUSION_ADDON"] = os.path.abspath(addon)
        else:
            self.env.pop("CUSTOM_DIFFUSION_ADDON", None)
        self.results["mode"]["addon"] = addon or "the loader's choice"

    def parity_section(self, dev: str, cuda: bool, small: bool, addon_label) -> None:
        configs = "sd1" if small and not cuda else "sd1,sd2"
        # Without TF32 (cuBLAS and cuDNN honour NVIDIA_TF32_OVERRIDE): with it, diffusers' own float32
        # step drifts from the CPU fixture by up to 8% in the K/V update on an H200, about what ours
        # does, so only a TF32-free run can tell an exact implementation from a wrong one (ours: 1.2e-3;
        # scripts/gpu/reference_drift.py measures the reference's side).
        env = {**self.env, "NVIDIA_TF32_OVERRIDE": "0"} if cuda else None
        sec = self.node_section(
            "parity",
            ["node", "scripts/gpu/parity.js", "--device", dev, "--dtypes", "float32,float16,bfloat16", "--configs", configs],
            cap=240,
            need=20,
            env=env,
        )
        if sec is not None:
            sec["addon"] = addon_label
            sec["tf32"] = "off (NVIDIA_TF32_OVERRIDE=0)" if cuda else "n/a"
            self.write()

    def node_section(self, name: str, cmd: list[str], cap: float, need: float, sampler: bool = False, env: dict | None = None) -> dict | None:
        t = now()
        limit = self.budget_for(cap, need)
        if limit is None:
            self.skip(name, f"budget ({self.remaining():.0f}s left, {need:.0f}s needed)")
            return None
        jf = os.path.join(self.work, f"{name}.json")
        if os.path.exists(jf):
            os.remove(jf)
        smi = GpuSampler() if sampler and self.a.device.startswith("cuda") and shutil.which("nvidia-smi") else None
        if smi:
            smi.start()
        code, out = self.call(cmd + ["--json", jf], limit, env)
        if smi:
            smi.stop()
        data = None
        if os.path.isfile(jf):
            with open(jf, encoding="utf-8") as f:
                data = json.load(f)
        if smi and data is not None:
            data["nvidiaSmi"] = smi.result()
        status = "ok" if code == 0 and data is not None else ("timeout" if code is None else "error")
        extra = {} if status == "ok" else {"error": tail(out)}
        extra["output"] = tail(out, 30)
        return self.section(name, status, now() - t, data, **extra)

    # ------------------------------------------------------------------ main
    def main(self) -> None:
        a = self.a
        want = set(a.sections.split(","))
        self.model = None
        try:
            if "env" in want or a.device == "auto":
                self.env_section()
            root = ((self.results.get("machine") or {}).get("libtorch") or {}).get("root")
            if root:
                # An addon built elsewhere has a run path to that machine's LibTorch: this one's first.
                lib_dir = os.path.join(root, "lib")
                self.env["LD_LIBRARY_PATH"] = lib_dir + (":" + self.env["LD_LIBRARY_PATH"] if self.env.get("LD_LIBRARY_PATH") else "")
            cuda = a.device.startswith("cuda")
            if cuda and not a.addon and not a.build_dir:
                a.build_dir = os.path.join(ROOT, "build-gpu")
            # The addon: given (--addon), or compiled here (on CUDA by default) while the model is made
            # and the parity suite runs on the pack's prebuilt addon when that fits this LibTorch.
            finish_build = None
            prebuilt = None
            parity_done = False
            dev = "cuda" if cuda else "cpu"
            if a.addon:
                t = now()
                info, out = self.probe_addon(a.addon)
                self.use_addon(a.addon)
                self.section("build", "ok" if self.usable(info) else "error", now() - t, {"from": "given", "addon": a.addon, "loaded": info},
                             **({} if self.usable(info) else {"error": "the given addon does not load or sees no CUDA: " + tail(out)}))
            elif "build" in want and a.build_dir:
                # A prebuilt addon for this very LibTorch lets the compile run beside the parity suite,
                # and shortens the compile's time limit (it stands in if the compile fails).
                prebuilt = self.prebuilt_for_this_machine()
                if prebuilt and not self.usable(self.probe_addon(prebuilt)[0]):
                    self.say(f"the prebuilt addon {prebuilt} does not load here")
                    self.results["mode"]["prebuilt"]["loads"] = False
                    prebuilt = None
                finish_build = self.start_build(240 if prebuilt else 360)
            else:
                t = now()
                info, out = self.probe_addon(None)
                self.section("build", "skipped" if self.usable(info) else "error", now() - t,
                             {"from": "existing (the loader's choice: build/Release or a prebuild)", "loaded": info},
                             **({"reason": "not asked for; using the existing addon"} if self.usable(info) else {"error": tail(out)}))
            finish_model = self.start_model() if "model" in want else (lambda: None)
            if finish_build is not None:
                if prebuilt:
                    self.use_addon(prebuilt)
                    if "parity" in want:
                        self.parity_section(dev, cuda, a.tiny or not cuda, addon_label="prebuilt (built elsewhere for this LibTorch)")
                        parity_done = True
                built = finish_build()
                if built:
                    self.use_addon(built)
                elif prebuilt:
                    self.say("the source build failed: the benchmarks use the prebuilt addon")
                    self.use_addon(prebuilt)
            finish_model()
            model = self.model or FIXTURE
            fixture = self.model is None
            self.results["mode"]["model"] = model
            small = a.tiny or not cuda
            if fixture:
                # The tiny fixture's VAE factor is 4 (32 px → 8×8 latents).
                res, size = 32, 32
            else:
                res, size = (64, 64) if small else (512, 512)
            threads = "1" if not cuda else "2"
            if "parity" in want and not parity_done:
                self.parity_section(dev, cuda, small, addon_label=self.results["mode"].get("addon"))
            if "train" in want:
                steps = ["--warmup", "1", "--steps", "2", "--rounds", "1"] if small else ["--warmup", "3", "--steps", "12", "--rounds", "3"]
                self.node_section(
                    "train",
                    ["node", "bench/train-step.js", "--model", model, "--device", dev, "--mixed-precision", "bf16", "--batch", "2" if not small else "1",
                     "--resolution", str(res), "--threads", threads] + steps,
                    cap=300,
                    need=30 if small else 90,
                    sampler=True,
                )
            if "checkpointing" in want:
                # Gradient checkpointing on the same batch as the training benchmark: the memory the
                # steps take above the loaded model, with and without it (each in a fresh process).
                self.node_section(
                    "checkpointing",
                    ["node", "bench/checkpointing.js", "--model", model, "--device", dev, "--mixed-precision", "bf16", "--batch", "2" if not small else "1",
                     "--resolution", str(res), "--threads", threads, "--steps", "2" if small else "4"],
                    cap=150,
                    need=20 if small else 60,
                )
            if "sample" in want:
                steps = ["--steps", "6", "--short-steps", "2", "--rounds", "2", "--mixed-batch", "2"] if small else ["--steps", "50", "--short-steps", "10", "--rounds", "3", "--mixed-batch", "4"]
                self.node_section(
                    "sample",
                    ["node", "bench/sample-step.js", "--model", model, "--device", dev, "--dtype", "float16", "--size", str(size), "--method", "calls",
                     "--mixed", "on", "--threads", threads] + steps,
                    cap=300,
                    need=30 if small else 60,
                    sampler=True,
                )
            self.results["summary"] = summarize(self.results)
            statuses = [s.get("status") for s in self.results["sections"].values()]
            self.results["status"] = "done" if all(x in ("ok", "skipped") for x in statuses) else "partial"
        except Exception as e:  # noqa: BLE001 - the results file must say what happened
            self.results["status"] = "crashed"
            self.results["error"] = repr(e)
            raise
        finally:
            self.results["finishedAt"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            self.results.setdefault("summary", summarize(self.results))
            self.write()
            # The table on stdout too: the device tool's reply shows the end of the output.
            print("\n" + render_markdown(self.results), flush=True)
            self.say(f"results: {os.path.join(self.out, 'gpu-run.json')} ({self.results['status']})")


class GpuSampler:
    """Samples nvidia-smi every half second: the most memory each process and the whole GPU used."""

    def __init__(self):
        self.stop_ev = threading.Event()
        self.per_pid: dict[str, int] = {}
        self.gpu_max = 0
        self.samples = 0
        self.th = threading.Thread(target=self.loop, daemon=True)

    def start(self):
        self.th.start()

    def loop(self):
        while not self.stop_ev.is_set():
            try:
                r = subprocess.run(
                    ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                )
                for line in r.stdout.strip().splitlines():
                    parts = [x.strip() for x in line.split(",")]
                    if len(parts) == 2 and parts[1].isdigit():
                        self.per_pid[parts[0]] = max(self.per_pid.get(parts[0], 0), int(parts[1]))
                g = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
                v = g.stdout.strip().splitlines()
                if v and v[0].strip().isdigit():
                    self.gpu_max = max(self.gpu_max, int(v[0].strip()))
                self.samples += 1
            except Exception:  # noqa: BLE001
                pass
            self.stop_ev.wait(0.5)

    def stop(self):
        self.stop_ev.set()
        self.th.join(timeout=15)

    def result(self) -> dict:
        return {"peakMiBByPid": self.per_pid, "peakGpuUsedMiB": self.gpu_max, "samples": self.samples}


def last_json(text: str, prefix: str = "", whole: bool = False):
    if whole:
        try:
            return json.loads(text[text.index("{") :])
        except Exception:  # noqa: BLE001
            return None
    for line in reversed(text.splitlines()):
        line = line.strip()
        if prefix and line.startswith(prefix):
            line = line[len(prefix) :]
        elif prefix:
            continue
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def tail(text: str, n: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def gb(b) -> float | None:
    return None if b is None else round(b / 1e9, 2)


def summarize(r: dict) -> dict:
    """The figures the issue asks for, flat (None where a section did not give them)."""
    s: dict = {"device": (r.get("machine") or {}).get("gpu") or r["mode"]["device"]}
    sec = r["sections"]
    p = (sec.get("parity") or {}).get("data")
    if p:
        s["parity"] = {
            dt: ({"passed": v["passed"], "checks": v["checks"], "errors": v["errors"], "skipped": v["skipped"],
                  "worst": v["worst"] and {k: v["worst"].get(k) for k in ("config", "case", "metric", "relError", "tol")}})
            for dt, v in p["summary"].items()
        }
    t = (sec.get("train") or {}).get("data")
    if t:
        ours, ref = t["ours"], t["diffusers"]
        tr = {
            "oursStepMs": ours.get("median_ms"),
            "diffusersStepMs": ref.get("median_ms"),
            "ratio": t.get("ratio_median"),
            "ratioTarget": TRAIN_TARGET_RATIO,
            "oursSetupSeconds": round((ours.get("loadMs") or 0) / 1000 + sum(ours.get("warmupMs") or []) / 1000, 1),
        }
        tr["meetsRatioTarget"] = None if tr["ratio"] is None else tr["ratio"] <= TRAIN_TARGET_RATIO
        if tr["oursStepMs"]:
            tr["projected250StepsSeconds"] = round(250 * tr["oursStepMs"] / 1000 + tr["oursSetupSeconds"], 1)
        if tr["diffusersStepMs"]:
            tr["diffusersProjected250StepsSeconds"] = round(250 * tr["diffusersStepMs"] / 1000 + ((ref.get("loadMs") or 0) + sum(ref.get("warmupMs") or [])) / 1000, 1)
        om, rm = ours.get("memory") or {}, ref.get("memory") or {}
        tr["oursPeakAllocatedGB"] = gb(om.get("peakAllocatedBytes"))
        tr["oursPeakReservedGB"] = gb(om.get("peakReservedBytes"))
        tr["diffusersPeakAllocatedGB"] = gb(rm.get("peakAllocatedBytes"))
        tr["diffusersPeakReservedGB"] = gb(rm.get("peakReservedBytes"))
        smi = t.get("nvidiaSmi") or {}
        by = smi.get("peakMiBByPid") or {}
        tr["oursNvidiaSmiPeakMiB"] = by.get(str(ours.get("pid")))
        tr["diffusersNvidiaSmiPeakMiB"] = by.get(str(ref.get("pid")))
        peak = tr["oursPeakReservedGB"] if tr["oursPeakReservedGB"] is not None else (None if tr["oursNvidiaSmiPeakMiB"] is None else tr["oursNvidiaSmiPeakMiB"] * 2**20 / 1e9)
        tr["peakMemoryTargetGB"] = TRAIN_TARGET_PEAK_GB
        tr["meetsMemoryTarget"] = None if peak is None else peak <= TRAIN_TARGET_PEAK_GB
        tr["config"] = {k: t["config"].get(k) for k in ("resolution", "batch", "mixedPrecision", "device", "steps", "rounds", "warmup")}
        s["train"] = tr
    c = (sec.get("checkpointing") or {}).get("data")
    if c:
        s["checkpointing"] = {
            "plainStepMiB": c["plain"]["stepMiB"],
            "checkpointingStepMiB": c["checkpointing"]["stepMiB"],
            "memoryRatio": c.get("activationMemoryRatio"),
            "timeRatio": c.get("timeRatio"),
            "loadedMiB": c["plain"]["baselineMiB"],
            "config": c.get("settings"),
        }
    g = (sec.get("sample") or {}).get("data")
    if g:
        sm = {
            "oursItPerSec": g.get("oursItPerSec"),
            "diffusersItPerSec": g.get("diffusersItPerSec"),
            "ratioStepTime": g.get("ratio"),
            "endToEndMs": g.get("endToEndMs"),
            "config": {k: g.get(k) for k in ("size", "steps", "dtype", "device", "method", "shortSteps")},
        }
        if g.get("conceptSwitch"):
            sm["conceptSwitch"] = g["conceptSwitch"]
        if g.get("mixedConcepts"):
            sm["mixedConcepts"] = g["mixedConcepts"]
        om = g.get("oursMemory") or {}
        rm = (g.get("reference") or {}).get("memory") or {}
        sm["oursPeakAllocatedGB"] = gb(om.get("peakAllocatedBytes"))
        sm["diffusersPeakAllocatedGB"] = gb(rm.get("peakAllocatedBytes"))
        # The memory bar: a 4-image 512 px SD1.5 batch (8 UNet rows with guidance) in 8 GB.
        mm = g.get("oursMemoryAfterMixed") or {}
        mixed_images = (g.get("mixedConcepts") or {}).get("images")
        sm["batchPeakReservedGB"] = gb(mm.get("peakReservedBytes"))
        sm["batchImages"] = mixed_images
        sm["meetsEightGB"] = (None if sm["batchPeakReservedGB"] is None or mixed_images != 4 or g.get("size") != 512
                              else sm["batchPeakReservedGB"] <= SAMPLE_BATCH_TARGET_GB)
        s["sample"] = sm
    b = (sec.get("build") or {}).get("data")
    if b:
        s["build"] = {"from": b.get("from"), "seconds": (sec.get("build") or {}).get("seconds"), "identity": (b.get("loaded") or {}).get("identity")}
    return s


def fmt(v, unit: str = "", digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        return f"{v:.{digits}f}{unit}"
    return str(v)


def render_markdown(r: dict) -> str:
    s = r.get("summary") or summarize(r)
    m = r.get("machine") or {}
    lines = [
        "# custom-diffusion GPU check",
        "",
        f"- status: **{r.get('status')}**, {r.get('elapsedSeconds')} s of a {r['mode'].get('budgetSeconds')} s budget; started {r.get('startedAt')}",
        f"- device: {m.get('gpu') or r['mode'].get('device')}{' (' + m['nvidiaSmi'] + ')' if m.get('nvidiaSmi') else ''}; torch {m.get('torch')} (CUDA {m.get('torchCuda')}), "
        f"diffusers {m.get('diffusers')}, transformers {m.get('transformers')}, Node {m.get('node')}",
        f"- commit: {(r.get('git') or {}).get('commit')}{' (with local changes)' if (r.get('git') or {}).get('dirty') else ''}; model: {r['mode'].get('model')}",
    ]
    if r["mode"].get("tiny") or r["mode"].get("device") == "cpu":
        lines.append("- **CPU / tiny mode: a test of the scripts, not a performance result.**")
    lines += ["", "| Section | Status | Seconds |", "|---|---|---|"]
    for name, sec in r["sections"].items():
        why = sec.get("reason") or (sec.get("error") or "").splitlines()[-1:] or [""]
        why = why if isinstance(why, str) else why[0]
        lines.append(f"| {name} | {sec.get('status')}{(' – ' + why[:120].replace('|', '/')) if why else ''} | {sec.get('seconds')} |")
    lines += ["", "| Figure | Ours | diffusers | Ours/diffusers | Target |", "|---|---|---|---|---|"]
    t = s.get("train")
    if t:
        c = t.get("config") or {}
        lines.append(
            f"| Training step, {2 * (c.get('batch') or 0)} images at {c.get('resolution')} px, {c.get('mixedPrecision')} mixed precision (median) | "
            f"{fmt(t.get('oursStepMs'), ' ms')} | {fmt(t.get('diffusersStepMs'), ' ms')} | {fmt(t.get('ratio'), '', 3)} | ≤ {TRAIN_TARGET_RATIO} ({fmt(t.get('meetsRatioTarget'))}) |"
        )
        lines.append(f"| Projected 250-step run (load + warm-up + 250 steps) | {fmt(t.get('projected250StepsSeconds'), ' s')} | {fmt(t.get('diffusersProjected250StepsSeconds'), ' s')} | | |")
        lines.append(
            f"| Peak GPU memory, training (allocator: allocated / reserved) | {fmt(t.get('oursPeakAllocatedGB'), ' GB', 2)} / {fmt(t.get('oursPeakReservedGB'), ' GB', 2)} | "
            f"{fmt(t.get('diffusersPeakAllocatedGB'), ' GB', 2)} / {fmt(t.get('diffusersPeakReservedGB'), ' GB', 2)} | | ≤ {TRAIN_TARGET_PEAK_GB:.0f} GB ({fmt(t.get('meetsMemoryTarget'))}) |"
        )
        if t.get("oursNvidiaSmiPeakMiB") or t.get("diffusersNvidiaSmiPeakMiB"):
            lines.append(f"| Peak process memory, training (nvidia-smi, with CUDA context) | {fmt(t.get('oursNvidiaSmiPeakMiB'), ' MiB', 0)} | {fmt(t.get('diffusersNvidiaSmiPeakMiB'), ' MiB', 0)} | | |")
    ck = s.get("checkpointing")
    if ck:
        c = ck.get("config") or {}
        lines.append(
            f"| Gradient checkpointing: memory the training steps take above the loaded model ({c.get('batch')} at {c.get('resolution')} px, {c.get('mixedPrecision')}; "
            f"{c.get('memory')}), plain → checkpointing; step time ratio | {fmt(ck.get('plainStepMiB'), ' MiB', 0)} → {fmt(ck.get('checkpointingStepMiB'), ' MiB', 0)} "
            f"(×{fmt(ck.get('memoryRatio'), '', 2)}); time ×{fmt(ck.get('timeRatio'), '', 2)} | | | |"
        )
    g = s.get("sample")
    if g:
        c = g.get("config") or {}
        lines.append(
            f"| Sampling, {c.get('steps')} DDIM steps with guidance, batch 1, {c.get('dtype')}, {c.get('size')} px (it/s, steady state) | "
            f"{fmt(g.get('oursItPerSec'), ' it/s', 2)} | {fmt(g.get('diffusersItPerSec'), ' it/s', 2)} | {fmt(g.get('ratioStepTime'), '', 3)} (step time) | |"
        )
        e = g.get("endToEndMs") or {}
        if e:
            lines.append(f"| Sampling, whole {c.get('steps')}-step call (encode, denoise, decode, copy) | {fmt(e.get('ours'), ' ms')} | {fmt(e.get('diffusers'), ' ms')} | {fmt(e.get('ours') / e['diffusers'] if e.get('ours') and e.get('diffusers') else None, '', 3)} | |")
        sw = g.get("conceptSwitch") or {}
        if sw:
            if "generateSwitchExtraMs" in sw:
                lines.append(f"| Concept switch: extra time of a {sw.get('generateSteps')}-step call with another concept than the last ({sw.get('layers')} K/V layers, {fmt(sw.get('deltaMB'), ' MB')}) | {fmt(sw.get('generateSwitchExtraMs'), ' ms')} | | | |")
            lines.append(f"| Concept switch: in-place apply + unapply | {fmt(sw.get('applyUnapplyMs'), ' ms')} | | | |")
        mc = g.get("mixedConcepts") or {}
        if mc:
            lines.append(
                f"| Mixed-concept batch of {mc.get('images')} (2 concepts, {mc.get('steps')} steps): images/s (vs separate calls, vs a one-concept batch) | "
                f"{fmt(mc.get('mixedImagesPerSec'), '', 2)} ({fmt(mc.get('separateImagesPerSec'), '', 2)}, {fmt(mc.get('uniformImagesPerSec'), '', 2)}) | | | |"
            )
        if g.get("oursPeakAllocatedGB") is not None or g.get("diffusersPeakAllocatedGB") is not None:
            lines.append(f"| Peak GPU memory, sampling (allocated) | {fmt(g.get('oursPeakAllocatedGB'), ' GB', 2)} | {fmt(g.get('diffusersPeakAllocatedGB'), ' GB', 2)} | | |")
        if g.get("batchPeakReservedGB") is not None:
            lines.append(f"| Peak GPU memory of the {g.get('batchImages')}-image batch (reserved; target ≤ {SAMPLE_BATCH_TARGET_GB:g} GB at 512 px) | "
                         f"{fmt(g.get('batchPeakReservedGB'), ' GB', 2)} | | | {fmt(g.get('meetsEightGB'))} |")
    p = s.get("parity")
    if p:
        lines += ["", "| Parity dtype | Within tolerance | Errors | Skipped | Worst (relative error / tolerance) |", "|---|---|---|---|---|"]
        for dt, v in p.items():
            w = v.get("worst") or {}
            worst = f"{w.get('config')} {w.get('case')} {w.get('metric')}: {w.get('relError'):.2e} / {w.get('tol')}" if w else "–"
            lines.append(f"| {dt} | {v['passed']}/{v['checks']} | {v['errors']} | {len(v['skipped'])} | {worst} |")
        skipped = [f"{dt}: {x}" for dt, v in p.items() for x in v["skipped"]]
        if skipped:
            lines += ["", "Skipped: " + "; ".join(skipped)]
    b = s.get("build")
    if b:
        lines += ["", f"Addon: {b.get('from')}, {b.get('seconds')} s, {b.get('identity')}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") and os.path.join(os.environ["OUT"], "results") or os.path.join(ROOT, "gpu-out"))
    ap.add_argument("--work", default=os.path.join(ROOT, "gpu-work"), help="models and section outputs (default ./gpu-work)")
    ap.add_argument("--device", default="auto", help="auto (cuda when torch sees a GPU), cuda or cpu")
    ap.add_argument("--tiny", action="store_true", help="reduced-width model and a few steps (a test of the scripts)")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for everything (default 480)")
    ap.add_argument("--build-dir", default=None, help="compile the addon here (default: use the loader's addon)")
    ap.add_argument("--addon", default=None, help="use this compiled addon (no build)")
    ap.add_argument("--prebuilt-addon", default=None, help="an addon built elsewhere: parity runs on it while the build runs, and it stands in if the build fails")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--sections", default="env,build,model,parity,train,checkpointing,sample")
    a = ap.parse_args()
    Run(a).main()


if __name__ == "__main__":
    main()
