"""Run one container of a rendered pod spec the way a kubelet and runtime would, without either.

Role: the node simulator plays kubelet for pod *status*; this module proves that a pod *spec*
works with the real program inside it. It starts the container's entrypoint with what the spec
says and nothing more: the user, group and supplemental ``fsGroup`` from the security contexts,
the working directory, a read-only root filesystem when ``readOnlyRootFilesystem`` is set, the
pod's volumes mounted at their ``mountPath`` (with ``subPath``), fresh and group-owned by
``fsGroup`` as the kubelet makes them, and the environment (the image's ``ENV``, then the
container's ``env``). The image is described by :class:`Image`: host files placed at image paths,
its ``ENV``, ``WORKDIR``, ``ENTRYPOINT`` and the directories its own user owns.

How: a private mount namespace (``unshare -m``) holding an overlay whose lower layer is the
host's root, so mount points can be made without touching the host; volumes are bind mounts of
host directories; ``chroot`` and ``setpriv`` drop to the pod's user. The network is the host's
(callers override the port variable when several run at once). Linux, root only:
:func:`unavailable` says why not elsewhere. Neighbours: tests of the chart's and the operator's
pod specs with ``realpeers``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmr_operator.testing import controlplane

STOP_GRACE_SECONDS = 5.0


@dataclass(frozen=True)
class Image:
    """What a container image would bring: files, ENV, WORKDIR, ENTRYPOINT, owned directories."""

    files: Mapping[str, Path]  # path in the image -> host file (mounted read-only)
    entrypoint: tuple[str, ...]
    workdir: str = "/"
    env: Mapping[str, str] = field(default_factory=dict)
    user: int = 0  # the image's USER as a number
    owned_dirs: tuple[str, ...] = ()  # directories `chown`ed to the image's user at build


def unavailable() -> str | None:
    """Why containers cannot be run here, or None."""
    if os.geteuid() != 0:
        return "running a container spec needs root (mount namespaces, chroot, setpriv)"
    missing = [tool for tool in ("unshare", "setpriv", "chroot", "mount") if not shutil.which(tool)]
    if missing:
        return f"missing {', '.join(missing)} (util-linux, coreutils)"
    return None


def _security(pod_spec: Mapping[str, Any], container: Mapping[str, Any]) -> dict[str, Any]:
    """The effective security settings: the container's own win over the pod's."""
    merged = dict(pod_spec.get("securityContext") or {})
    merged.update(container.get("securityContext") or {})
    return merged


class ContainerSandbox(controlplane.StartStopContext):
    """One container of ``pod_spec`` running as its spec says, with its volumes under ``root``.

    Volumes (emptyDir, claims) are directories ``root/volumes/<name>`` that outlive a restart,
    as a pod's do; ``env_overrides`` change variables after the spec's (e.g. a free port).
    """

    def __init__(
        self,
        *,
        pod_spec: Mapping[str, Any],
        container: str,
        image: Image,
        root: Path,
        env_overrides: Mapping[str, str] | None = None,
    ) -> None:
        self.pod_spec = pod_spec
        containers = [*pod_spec.get("containers", []), *pod_spec.get("initContainers", [])]
        found = [c for c in containers if c.get("name") == container]
        if not found:
            raise LookupError(f"the pod spec has no container {container!r}")
        self.container: Mapping[str, Any] = found[0]
        self.image = image
        self.root = root
        self.env_overrides = dict(env_overrides or {})
        self.log_path = root / f"{container}.log"
        self.process: subprocess.Popen[bytes] | None = None

    # -- what the spec says ---------------------------------------------------------------

    @property
    def uid(self) -> int:
        return int(_security(self.pod_spec, self.container).get("runAsUser", self.image.user))

    @property
    def gid(self) -> int:
        return int(_security(self.pod_spec, self.container).get("runAsGroup", self.uid))

    @property
    def fs_group(self) -> int | None:
        value = (self.pod_spec.get("securityContext") or {}).get("fsGroup")
        return None if value is None else int(value)

    @property
    def read_only_root(self) -> bool:
        return bool(_security(self.pod_spec, self.container).get("readOnlyRootFilesystem"))

    def environment(self) -> dict[str, str]:
        env = dict(self.image.env)
        for variable in self.container.get("env") or []:
            if "value" in variable:  # valueFrom needs the API; none of ours uses it here
                env[variable["name"]] = str(variable["value"])
        env.update(self.env_overrides)
        return env

    def volume_dir(self, name: str) -> Path:
        return self.root / "volumes" / name

    # -- running ----------------------------------------------------------------------------

    def script(self) -> str:
        """The shell script run inside the private mount namespace (printed in the log).

        Paths inside the container are resolved inside its root (``chroot ... readlink -f``):
        the host's ``/var/run`` is a symlink to ``/run``, and following it from outside would
        reach the host's own directories.
        """
        layers = self.root / "layers"
        merged = layers / "merged"
        lines = [
            "set -eu",
            f"ROOT={_q(merged)}",
            # The directory inside the root that a container path names, symlinks resolved there.
            'inside() { echo "$ROOT$(chroot "$ROOT" readlink -f "$1")"; }',
            'make_dir() { chroot "$ROOT" mkdir -p "$1"; }',
            'make_file() { make_dir "$(dirname "$1")"; chroot "$ROOT" touch "$1"; }',
            f"mount -t tmpfs tmpfs {_q(layers)}",
            f'mkdir -p {_q(layers / "upper")} {_q(layers / "work")} "$ROOT"',
            f"mount -t overlay overlay -o lowerdir=/,upperdir={_q(layers / 'upper')},"
            f'workdir={_q(layers / "work")} "$ROOT"',
        ]
        # The image's layer: its files, its directories, the mount points of the volumes.
        for image_path in self.image.files:
            lines.append(f"make_file {shlex.quote(image_path)}")
        for directory in (self.image.workdir, *self.image.owned_dirs):
            lines.append(f"make_dir {shlex.quote(directory)}")
        for directory in self.image.owned_dirs:
            owner = f"{self.image.user}:{self.image.user}"
            lines.append(f'chown {owner} "$(inside {shlex.quote(directory)})"')
        working_dir = str(self.container.get("workingDir") or self.image.workdir)
        lines.append(f"make_dir {shlex.quote(working_dir)}")
        mounts = list(self.container.get("volumeMounts") or [])
        for mount in mounts:
            lines.append(f"make_dir {shlex.quote(mount['mountPath'])}")
        if self.read_only_root:
            lines.append('mount -o remount,ro "$ROOT"')
        for image_path, host_file in self.image.files.items():
            target = f'"$(inside {shlex.quote(image_path)})"'
            lines.append(f"mount --bind {_q(host_file)} {target}")
            lines.append(f"mount -o remount,bind,ro {target}")
        for mount in mounts:
            source = self.volume_dir(mount["name"])
            if mount.get("subPath"):
                source = source / mount["subPath"]
            target = f'"$(inside {shlex.quote(mount["mountPath"])})"'
            lines.append(f"mount --bind {_q(source)} {target}")
            if mount.get("readOnly"):
                lines.append(f"mount -o remount,bind,ro {target}")
        for special in ("proc", "dev", "sys"):
            lines.append(f'mount --rbind /{special} "$ROOT/{special}"')
        groups = [str(self.gid)] + ([str(self.fs_group)] if self.fs_group is not None else [])
        env = [f"{name}={value}" for name, value in self.environment().items()]
        command = " ".join(shlex.quote(part) for part in self.image.entrypoint)
        entry = f"cd {shlex.quote(working_dir)} && exec {command}"
        lines.append(
            f'exec chroot "$ROOT" setpriv --reuid {self.uid} --regid {self.gid} '
            f"--groups {','.join(groups)} --inh-caps=-all --bounding-set=-all "
            f"env -i {' '.join(shlex.quote(item) for item in env)} sh -c {shlex.quote(entry)}"
        )
        return "\n".join(lines) + "\n"

    def _prepare_volumes(self) -> None:
        """Fresh volume directories as the kubelet makes them (group fsGroup, setgid)."""
        for volume in self.pod_spec.get("volumes") or []:
            directory = self.volume_dir(volume["name"])
            directory.mkdir(parents=True, exist_ok=True)
        for mount in self.container.get("volumeMounts") or []:
            directory = self.volume_dir(mount["name"])
            directory.mkdir(parents=True, exist_ok=True)  # claims from volumeClaimTemplates
            targets = [directory]
            if mount.get("subPath"):  # the kubelet creates a missing subPath directory
                targets.append(directory / mount["subPath"])
                targets[-1].mkdir(parents=True, exist_ok=True)
            for target in targets:
                if self.fs_group is not None:
                    os.chown(target, 0, self.fs_group)
                    target.chmod(0o2775)
                else:
                    target.chmod(0o777)
        (self.root / "layers").mkdir(parents=True, exist_ok=True)

    def start(self) -> ContainerSandbox:
        reason = unavailable()
        if reason:
            raise RuntimeError(reason)
        self._prepare_volumes()
        script = self.script()
        with self.log_path.open("ab") as log:
            log.write(f"--- sandbox script ---\n{script}--- container output ---\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, *, grace: float = STOP_GRACE_SECONDS) -> None:
        if self.process is not None:
            controlplane.stop_process_group(self.process, grace=grace)

    def log_tail(self, lines: int = 30) -> str:
        return controlplane.log_tail(self.log_path, lines)


def _q(base: Path | str, inside: str | None = None) -> str:
    """A shell-quoted host path, or the path ``inside`` the sandbox root ``base``."""
    path = str(base) if inside is None else str(base) + "/" + inside.lstrip("/")
    return shlex.quote(path)
