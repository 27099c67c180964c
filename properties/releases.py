"""Release ranges: which releases of a library a known bug affects (``[peft>=0.9,<0.14]``).

A known bug is a fact about a range of releases, not about the one release whose expected-failures file
lists it. An xfails line may therefore start with a range, ``[NAME CLAUSE,CLAUSE...]`` where each clause is
an operator (``>=``, ``>``, ``<=``, ``<``, ``==``, ``!=``) and a version; the line applies to a run against
``NAME`` at a version that satisfies every clause. By convention the lower end is the first release with
the bug and the upper end the first release without it, each verified (``docs/peft-releases.md``).

Versions compare as PEP 440 releases do for the forms libraries publish: numeric parts (missing parts are
zero, so ``0.14`` == ``0.14.0``), then ``.devN`` < ``aN`` < ``bN`` < ``rcN`` < final < ``.postN``; a local
part (``+cpu``) is ignored. This needs no third-party package.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_VERSION = re.compile(
    r"^v?(?P<release>\d+(?:\.\d+)*)"
    r"(?:[-_.]?(?P<pre>a|alpha|b|beta|rc|c)[-_.]?(?P<pre_n>\d*))?"
    r"(?:[-_.]?post[-_.]?(?P<post>\d*))?"
    r"(?:[-_.]?dev[-_.]?(?P<dev>\d*))?"
    r"(?:\+[a-z0-9.]+)?$",
    re.IGNORECASE,
)
_PRE_RANK = {"a": 1, "alpha": 1, "b": 2, "beta": 2, "rc": 3, "c": 3}
_OPS = ("==", "!=", ">=", "<=", ">", "<")
_RANGE = re.compile(r"^\[\s*(?P<name>[A-Za-z][A-Za-z0-9_.-]*?)\s*(?P<clauses>(?:==|!=|>=|<=|>|<)[^\]]*)\]")


def version_key(version: str) -> tuple:
    """A sort key for ``version``; ``ValueError`` if it is not a release version."""
    m = _VERSION.match(version.strip())
    if not m:
        raise ValueError(f"{version!r} is not a release version (like 0.14 or 0.14.0)")
    release = tuple(int(p) for p in m["release"].split("."))
    release = release + (0,) * (6 - len(release)) if len(release) < 6 else release
    if m["pre"]:
        stage = (_PRE_RANK[m["pre"].lower()], int(m["pre_n"] or 0))
    elif m["dev"] is not None and m["post"] is None:
        stage = (0, 0)  # 0.14.0.dev1 comes before 0.14.0a1
    else:
        stage = (4, 0)
    post = int(m["post"] or 0) if m["post"] is not None else -1
    dev = int(m["dev"] or 0) if m["dev"] is not None else float("inf")
    return (release, stage, post, dev)


@dataclass(frozen=True)
class ReleaseRange:
    """``[name op version, ...]``: the releases of library ``name`` a line applies to."""

    name: str
    clauses: tuple[tuple[str, str], ...]

    def contains(self, version: str) -> bool:
        """Whether ``version`` satisfies every clause (a version that does not parse is outside)."""
        try:
            v = version_key(version)
        except ValueError:
            return False
        for op, bound in self.clauses:
            b = version_key(bound)
            ok = {
                "==": v == b,
                "!=": v != b,
                ">=": v >= b,
                "<=": v <= b,
                ">": v > b,
                "<": v < b,
            }[op]
            if not ok:
                return False
        return True

    def applies_to(self, target: str, version: str) -> bool:
        return self.name == target and self.contains(version)

    def __str__(self) -> str:
        return f"[{self.name}{','.join(op + v for op, v in self.clauses)}]"


def exact(name: str, version: str) -> ReleaseRange:
    """The range of one release: what an unranged line of ``NAME-VERSION.txt`` has always meant."""
    version_key(version)
    return ReleaseRange(name, (("==", version),))


def parse_range(text: str) -> tuple[ReleaseRange | None, str]:
    """Split a leading ``[name clauses]`` off ``text``: ``(range or None, the rest)``.

    ``ValueError`` says what is wrong with a malformed range (a line starting with ``[`` is always one).
    """
    stripped = text.lstrip()
    if not stripped.startswith("["):
        return None, text
    m = _RANGE.match(stripped)
    if not m:
        raise ValueError(
            f"release range {stripped.split(']')[0]}]: expected '[NAME>=A,<B]' (operators "
            f"{', '.join(_OPS)}), e.g. [peft>=0.14,<0.19]"
        )
    clauses = []
    for raw in m["clauses"].split(","):
        clause = raw.strip()
        op = next((o for o in _OPS if clause.startswith(o)), None)
        if op is None or not clause[len(op) :].strip():
            raise ValueError(f"release range [{m['name']}{m['clauses']}]: bad clause {clause!r}")
        bound = clause[len(op) :].strip()
        try:
            version_key(bound)
        except ValueError as e:
            raise ValueError(f"release range [{m['name']}{m['clauses']}]: {e}") from None
        clauses.append((op, bound))
    rng = ReleaseRange(m["name"], tuple(clauses))
    if not any(rng.contains(v) for v in _probe_versions(rng)):
        raise ValueError(f"release range {rng}: no release satisfies every clause")
    return rng, stripped[m.end() :]


def _probe_versions(rng: ReleaseRange) -> list[str]:
    """Versions at and around each bound: an empty range (``>=0.5,<0.4``) contains none of them."""
    probes = ["0", "999999"]
    for _, bound in rng.clauses:
        parts = [int(p) for p in re.findall(r"\d+", bound.split("+")[0])[:6]] or [0]
        probes.append(bound)
        probes.append(".".join(map(str, [*parts, 1])))  # just above
        probes.append(bound + ".dev0")  # just below
        probes.append(".".join(map(str, [*parts[:-1], parts[-1] + 1])))
        if parts[-1] > 0:
            probes.append(".".join(map(str, [*parts[:-1], parts[-1] - 1, 999])))
    return probes
