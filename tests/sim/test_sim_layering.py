"""The simulator stays torch- and zmq-free, through every engine module it reaches."""

from __future__ import annotations

from pathlib import Path

from layering import ENGINE, runtime_imports

FORBIDDEN = {"zmq", "torch"}


def _module_file(name: str) -> Path | None:
    """The file of an ``engine.*`` module (a package's __init__.py), or None."""
    parts = name.split(".")
    if parts[0] != "engine":
        return None
    base = ENGINE.joinpath(*parts[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.exists():
            return path
    return None


def reachable_imports(start: list[Path]) -> dict[str, str]:
    """Every module imported by ``start`` or by the engine modules they reach, with the file
    that imports it (imports under ``if TYPE_CHECKING:`` included: a stricter rule)."""
    seen: dict[str, str] = {}
    todo = list(start)
    done: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in done:
            continue
        done.add(path)
        for name in runtime_imports(path):
            seen.setdefault(name, str(path.relative_to(ENGINE.parent)))
            for prefix in [".".join(name.split(".")[: i + 1]) for i in range(len(name.split(".")))]:
                target = _module_file(prefix)
                if target is not None:
                    todo.append(target)
    return seen


def test_the_simulator_reaches_neither_zmq_nor_torch() -> None:
    files = sorted((ENGINE / "sim").glob("*.py"))
    assert len(files) >= 5
    imports = reachable_imports(files)
    assert "engine.broker.core" in imports and "engine.scheduler.factory" in imports
    bad = {n: by for n, by in imports.items() if n.split(".")[0] in FORBIDDEN}
    assert not bad, f"the simulator reaches {bad}"


def test_the_walker_sees_torch_where_it_is() -> None:
    imports = reachable_imports([ENGINE / "worker" / "executor.py"])
    assert any(n.split(".")[0] == "torch" for n in imports)


def test_running_a_simulation_loads_neither_zmq_nor_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from engine.config import SchedulerConfig\n"
        "from engine.sim.cluster import Simulation, SimItem\n"
        "from engine.sim.devices import device_model\n"
        "sim = Simulation(SchedulerConfig(), [device_model('a100-80gb:llama-2-7b')] * 2)\n"
        "out = sim.run([SimItem(i, 32, 8) for i in range(20)], [0.0] * 20)\n"
        "assert all(r.success for r in out.records)\n"
        "print(sorted(m for m in ('torch', 'zmq') if m in sys.modules))\n"
    )
    root = ENGINE.parent
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
