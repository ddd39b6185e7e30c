"""Wheels for a GPU machine without package access (an air-gapped node, or the device machines of this project).

    python3 tools/offline_wheels.py download DIR [--fa4] [--split-mb 48]   # where pip reaches an index
    python3 tools/offline_wheels.py install DIR TARGET                      # on the GPU machine; then PYTHONPATH=TARGET

TARGET must be a folder named site-packages (e.g. /tmp/py/site-packages) when the wheels include quack-kernels: quack
fingerprints the code its GEMM epilogues reference and treats only code under a site-packages folder as installed;
from anywhere else its GEMMs fail at their first call (`... has no fail-closed semantic key`).

download fetches train_gpt.py's optional packages that a CUDA torch image lacks (brotli, bzip3; with --fa4
flash-attn-4 and its CuTe DSL stack for torch cu13) as CPython 3.12 x86-64 wheels, and splits any file over
--split-mb into NAME.partNN pieces (for transfers with a size cap). install joins the pieces and unpacks every wheel
into TARGET. It unpacks rather than `pip install --target --upgrade`, which replaces a top-level folder wheel by wheel:
the three nvidia-cutlass-dsl-libs-* wheels all fill nvidia_cutlass_dsl/, and only the last would survive
(`No module named 'cutlass.cute'`). A .pth that puts a package's subfolder on sys.path (PYTHONPATH does not read .pth
files) is replaced by symlinks to that subfolder's entries.
"""
import argparse, glob, os, re, subprocess, sys, zipfile

PACKAGES = ["brotli", "bzip3==0.1.10"]
FA4_PACKAGES = ["flash-attn-4==4.0.0b36", "nvidia-cutlass-dsl==4.8.1", "nvidia-cutlass-dsl-libs-base==4.8.1",
                "nvidia-cutlass-dsl-libs-core==4.8.1", "nvidia-cutlass-dsl-libs-cu13==4.8.1", "quack-kernels==0.6.5",
                "apache-tvm-ffi==0.1.11", "torch-c-dlpack-ext", "einops"]  # the set checked with torch 2.11+cu130
PLATFORMS = ["manylinux_2_%d_x86_64" % n for n in (17, 24, 27, 28, 31, 34, 35)]
PLATFORMS += ["manylinux2014_x86_64", "manylinux1_x86_64"]
# a .pth line of the form sys.path.insert(0, os.path.join(pkg.__path__[0], 'sub'))
PTH_SUBDIR = re.compile(r"import .*?\b(\w+)\.__path__\[0\],\s*'([^']+)'")


def split_large(path, limit):
    if os.path.getsize(path) <= limit:
        return
    with open(path, "rb") as f:
        for i, chunk in enumerate(iter(lambda: f.read(limit), b"")):
            with open(f"{path}.part{i:02d}", "wb") as out:
                out.write(chunk)
    os.remove(path)


def download(out, fa4, split_mb):
    os.makedirs(out, exist_ok=True)
    flags = ["--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
    flags += [a for p in PLATFORMS for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", *flags, "-d", out,
                    *PACKAGES, *(FA4_PACKAGES if fa4 else [])], check=True)
    for path in glob.glob(os.path.join(out, "*.whl")):
        split_large(path, split_mb << 20)


def join_parts(src):
    for first in sorted(glob.glob(os.path.join(src, "*.whl.part00"))):
        whole = first[: -len(".part00")]
        with open(whole, "wb") as out:
            for part in sorted(glob.glob(whole + ".part[0-9][0-9]")):
                out.write(open(part, "rb").read())


def link_pth_subdirs(target):
    for pth in glob.glob(os.path.join(target, "*.pth")):
        for pkg, sub in PTH_SUBDIR.findall(open(pth).read()):
            subdir = os.path.join(target, pkg, sub)
            for entry in sorted(os.listdir(subdir)) if os.path.isdir(subdir) else []:
                link = os.path.join(target, entry)
                if os.path.islink(link):
                    os.remove(link)
                os.symlink(os.path.join(subdir, entry), link)


def install(src, target):
    join_parts(src)
    wheels = sorted(glob.glob(os.path.join(src, "*.whl")))
    if not wheels:
        sys.exit(f"error: no wheels in {src}: run `python3 tools/offline_wheels.py download {src}` where pip works")
    if any(os.path.basename(w).startswith("quack_kernels") for w in wheels) \
            and os.path.basename(os.path.normpath(target)) != "site-packages":
        sys.exit(f"error: {target} is not a folder named site-packages, which quack-kernels needs (its GEMMs fail from "
                 f"anywhere else): use e.g. {os.path.join(target, 'site-packages')}")
    os.makedirs(target, exist_ok=True)
    for whl in wheels:
        with zipfile.ZipFile(whl) as z:
            if any(".data/" in n for n in z.namelist()):
                sys.exit(f"error: {whl} has a .data folder (scripts or headers): install it with pip instead")
            z.extractall(target)
    link_pth_subdirs(target)
    print(f"unpacked {len(wheels)} wheels into {target}; use: export PYTHONPATH={target}:$PYTHONPATH")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("download")
    d.add_argument("dir")
    d.add_argument("--fa4", action="store_true", help="also flash-attn-4 and its CuTe DSL stack (cu13)")
    d.add_argument("--split-mb", type=int, default=48, help="split wheels larger than this into .partNN files")
    i = sub.add_parser("install")
    i.add_argument("dir")
    i.add_argument("target")
    a = ap.parse_args()
    download(a.dir, a.fa4, a.split_mb) if a.cmd == "download" else install(a.dir, a.target)


if __name__ == "__main__":
    main()
