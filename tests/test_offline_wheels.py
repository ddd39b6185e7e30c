"""tools/offline_wheels.py install: split wheels are joined, wheels sharing a folder are merged (pip --target --upgrade
would keep only the last one's), and a .pth's package subfolder becomes importable through PYTHONPATH alone."""
import os, subprocess, sys, zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "offline_wheels.py")


def wheel(path, files):
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)


def test_install_merges_shared_folders_joins_parts_and_links_pth_subdirs(tmp_path):
    src, target = tmp_path / "wheels", tmp_path / "site"
    src.mkdir()
    pth = "import sys, os, dsl; sys.path.insert(0, os.path.join(dsl.__path__[0], 'packages'))\n"
    wheel(src / "dsl-1.0-py3-none-any.whl", {"dsl_packages.pth": pth, "dsl-1.0.dist-info/METADATA": "Name: dsl\n"})
    # two "libs" wheels fill the same folders (like nvidia-cutlass-dsl-libs-base / -core / -cu13)
    wheel(src / "dsl_libs_base-1.0-py3-none-any.whl", {"dsl/__init__.py": "", "dsl/packages/cut/__init__.py": "",
                                                       "dsl/packages/cut/mlir.py": "X = 1\n"})
    big = src / "dsl_libs_core-1.0-py3-none-any.whl"
    wheel(big, {"dsl/packages/cut/cute.py": "Y = 2\n" + "#" * 5000 + "\n"})
    data = big.read_bytes()  # as `download --split-mb` leaves it: NAME.part00, NAME.part01, ... and no NAME
    for i in range(0, len(data), 1000):
        (src / f"{big.name}.part{i // 1000:02d}").write_bytes(data[i:i + 1000])
    big.unlink()

    r = subprocess.run([sys.executable, TOOL, "install", str(src), str(target)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert big.read_bytes() == data
    probe = "import cut.mlir, cut.cute; print(cut.mlir.X + cut.cute.Y)"
    env = dict(os.environ, PYTHONPATH=str(target))
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "3", r.stderr


def test_install_refuses_an_empty_folder_with_the_fix(tmp_path):
    (tmp_path / "wheels").mkdir()
    r = subprocess.run([sys.executable, TOOL, "install", str(tmp_path / "wheels"), str(tmp_path / "site")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "no wheels in" in r.stderr and "offline_wheels.py download" in r.stderr


def test_install_wants_a_site_packages_target_for_quack(tmp_path):
    """quack-kernels' GEMMs fail at their first call from outside a site-packages folder: refused before unpacking."""
    src = tmp_path / "wheels"
    src.mkdir()
    wheel(src / "quack_kernels-0.6.5-py3-none-any.whl", {"quack/__init__.py": ""})
    run = lambda target: subprocess.run([sys.executable, TOOL, "install", str(src), str(target)], capture_output=True,
                                        text=True)
    r = run(tmp_path / "site")
    assert r.returncode != 0 and "site-packages" in r.stderr and not (tmp_path / "site").exists()
    r = run(tmp_path / "py" / "site-packages")
    assert r.returncode == 0 and (tmp_path / "py" / "site-packages" / "quack" / "__init__.py").exists(), r.stderr
