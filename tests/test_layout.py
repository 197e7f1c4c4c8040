"""The shape of pallas_kernels: the kernel modules import only `common` (and a kernel its
own companion launch), which imports no kernel; the fronts import the kernels; no import
cycle, no import inside a function, no private name taken from another module. Read from the
source (ast), nothing is imported."""
from __future__ import annotations

import ast
import pathlib

PKG = pathlib.Path(__file__).resolve().parent.parent / "pallas_kernels"
KERNELS = {"attention_triton", "attention_mgpu", "decode_triton", "decode_mgpu",
           "decode_mgpu_merge"}
# a kernel module's own second launch, in a file of its own (another backend): the only
# kernel a kernel module may import
COMPANIONS = {"decode_mgpu": {"decode_mgpu_merge"}}


def package_imports():
  """{module: [(imported module, imported names, at the module's top level)]}, the package's
  own modules only (`__init__` for names taken from the package itself)."""
  modules = {p.stem for p in PKG.glob("*.py")}
  out = {}
  for path in sorted(PKG.glob("*.py")):
    tree = ast.parse(path.read_text())
    edges = []
    for node in ast.walk(tree):
      top = node in tree.body
      if isinstance(node, ast.Import):
        edges += [(a.name.split(".")[1] if "." in a.name else "__init__", [], top)
                  for a in node.names if a.name.split(".")[0] == "pallas_kernels"]
      elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pallas_kernels"):
        if node.module == "pallas_kernels":
          for a in node.names:
            edges.append((a.name, [], top) if a.name in modules
                         else ("__init__", [a.name], top))
        else:
          edges.append((node.module.split(".")[1], [a.name for a in node.names], top))
    out[path.stem] = edges
  return out


def test_kernels_import_only_common():
  deps = {m: {d for d, _, _ in edges} for m, edges in package_imports().items()}
  assert deps["common"] == set()
  assert KERNELS <= set(deps)
  for m in KERNELS:
    assert deps[m] <= {"common"} | COMPANIONS.get(m, set()), (m, deps[m])
  for m, comp in COMPANIONS.items():
    assert all(deps[c] <= {"common"} for c in comp), (m, comp)


def test_no_cycle_no_lazy_import_no_private_names():
  graph = package_imports()
  for m, edges in graph.items():
    for dep, names, top in edges:
      assert top, f"{m} imports {dep} inside a function"
      assert not [n for n in names if n.startswith("_")], f"{m} takes {names} from {dep}"
  done, path = set(), []

  def visit(m):
    assert m not in path, f"import cycle: {' -> '.join(path + [m])}"
    if m in done:
      return
    path.append(m)
    for dep, _, _ in graph[m]:
      visit(dep)
    path.pop()
    done.add(m)

  for m in graph:
    visit(m)
