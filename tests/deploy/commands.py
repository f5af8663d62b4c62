"""What the Docker assets under docker/ run: a small reader of Dockerfiles (instructions, stages,
the CMD and ENTRYPOINT each target inherits) and of compose files, and `docker_commands()`, every
`swarmnet` command line they start, for checking against the CLI."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ENTRYPOINT = ["swarmnet"]
"""The entrypoint of every swarmnet image: a CMD, or a compose `command:`, is its arguments."""


@dataclass(frozen=True, kw_only=True)
class Instruction:
    keyword: str
    """Upper case: FROM, RUN, CMD..."""
    args: str
    """The rest of the instruction, continuation lines joined."""
    line: int
    """1-based line where the instruction starts."""


@dataclass(kw_only=True)
class Stage:
    name: str | None
    """The `AS` name (lower case); none for an unnamed stage."""
    base: str
    """The image or stage it starts from, as written (build args unexpanded)."""
    instructions: list[Instruction] = field(default_factory=list)


def instructions(text: str) -> list[Instruction]:
    """The instructions of a Dockerfile: comment lines dropped (also inside continuations, as
    Docker does), lines ending in a backslash joined to the next."""
    result: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        pending.append(line)
        joined = " ".join(part for part in pending if part)
        pending = []
        keyword, _, args = joined.partition(" ")
        result.append(Instruction(keyword=keyword.upper(), args=args.strip(), line=start))
    return result


def stages(text: str) -> list[Stage]:
    """The build stages of a Dockerfile, in order."""
    found: list[Stage] = []
    for ins in instructions(text):
        if ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--")]  # drop --platform=...
            name = words[2].lower() if len(words) >= 3 and words[1].upper() == "AS" else None
            found.append(Stage(name=name, base=words[0], instructions=[]))
        elif found:
            found[-1].instructions.append(ins)
    return found


def exec_form(ins: Instruction) -> list[str]:
    """The JSON array of a CMD or ENTRYPOINT; ValueError for the shell form."""
    try:
        value = json.loads(ins.args)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"line {ins.line}: {ins.keyword} is not in exec form (a JSON array): {ins.args}")
    return value


def inherited(all_stages: list[Stage], stage: Stage, keyword: str) -> Instruction | None:
    """The last `keyword` instruction in effect in `stage`: its own, else its base stage's."""
    by_name = {s.name: s for s in all_stages if s.name}
    seen: set[str] = set()
    current: Stage | None = stage
    while current is not None:
        own = [i for i in current.instructions if i.keyword == keyword]
        if own:
            return own[-1]
        base = current.base.lower()
        if base in seen:
            return None
        seen.add(base)
        current = by_name.get(base)
    return None


def dockerfiles(repo: Path) -> list[Path]:
    """Every Dockerfile under docker/ (not their .dockerignore files)."""
    return sorted(
        p
        for p in (repo / "docker").rglob("Dockerfile*")
        if p.is_file() and not p.name.endswith(".dockerignore")
    )


def compose_files(repo: Path) -> list[Path]:
    """Every compose file under docker/."""
    names = re.compile(r"^(docker-)?compose(\.[\w-]+)?\.ya?ml$")
    return sorted(p for p in (repo / "docker").rglob("*.y*ml") if names.match(p.name))


def load_compose(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def built_dockerfile(compose: Path, service: dict) -> Path | None:
    """The Dockerfile a compose service builds from, if it builds one."""
    build = service.get("build")
    if build is None:
        return None
    if isinstance(build, str):
        build = {"context": build}
    context = (compose.parent / build.get("context", ".")).resolve()
    return (context / build.get("dockerfile", "Dockerfile")).resolve()


def swarmnet_services(repo: Path, compose: Path) -> dict[str, dict]:
    """The services of a compose file that run a swarmnet image: built from a Dockerfile under
    docker/, or using the image such a service builds."""
    services = load_compose(compose).get("services", {})
    ours = {p.resolve() for p in dockerfiles(repo)}
    built = {name: s for name, s in services.items() if built_dockerfile(compose, s) in ours}
    images = {s["image"] for s in built.values() if "image" in s}
    return {name: s for name, s in services.items() if name in built or s.get("image") in images}


def docker_commands(repo: Path) -> list[tuple[str, list[str]]]:
    """(where, argv after `swarmnet`) of every swarmnet command the Docker assets run: each
    Dockerfile stage's own CMD under the `swarmnet` entrypoint (HEALTHCHECKs are not commands),
    and each compose `command:` of a swarmnet service. `where` is `docker/Dockerfile:<target>` or
    `docker/compose.yml:<service>`."""
    repo = Path(repo)
    found: list[tuple[str, list[str]]] = []
    for path in dockerfiles(repo):
        where = path.relative_to(repo).as_posix()
        all_stages = stages(path.read_text())
        for stage in all_stages:
            cmds = [i for i in stage.instructions if i.keyword == "CMD"]
            entrypoint = inherited(all_stages, stage, "ENTRYPOINT")
            if cmds and entrypoint is not None and exec_form(entrypoint) == ENTRYPOINT:
                found.append((f"{where}:{stage.name}", exec_form(cmds[-1])))
    for path in compose_files(repo):
        where = path.relative_to(repo).as_posix()
        for name, service in swarmnet_services(repo, path).items():
            command = service.get("command")
            if command is None or "entrypoint" in service:
                continue
            argv = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
            found.append((f"{where}:{name}", argv))
    return found
