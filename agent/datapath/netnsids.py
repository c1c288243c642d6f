"""Small numeric ids for network namespaces, carried in kipfix's tc filters.

cls_bpf copies a filter's classid into skb->tc_classid before running the
program, so the 16-bit minor of the classid tells the program which netns it
meters in (bpf_get_netns_cookie reports the socket's netns, not the
device's). Ids live in a JSON file beside the pins' lifetime (/run, cleared
at boot like bpffs), so a restarted agent reads old flows correctly.
"""

from __future__ import annotations

import json
import os
import threading

MAX_ID = 0xFFFF
CLASSID_MAJOR = 0x4B00_0000  # "K" major: any value works, it only has to be stable


STATE_DIR = "/run/kipfix"


def default_path(pin_path: str) -> str:
    """The id file belonging to the tables pinned at ``pin_path``."""
    return os.path.join(STATE_DIR, "netns-ids" + pin_path.replace("/", "_") + ".json")


def classid(netns_id: int) -> int:
    return CLASSID_MAJOR | netns_id


class NetnsIds:
    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._by_id: dict[int, dict] = {}
        try:
            with open(path, encoding="utf-8") as handle:
                self._by_id = {int(k): v for k, v in json.load(handle).items()}
        except FileNotFoundError:
            pass
        except (ValueError, OSError):
            self._by_id = {}

    def _save(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
        tmp = f"{self.path}.tmp"
        # 0600: the labels name the pods and namespaces metered on this node
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), 0o600)  # a .tmp left by an older agent keeps its mode otherwise
            json.dump({str(k): v for k, v in self._by_id.items()}, handle)
        os.replace(tmp, self.path)

    def assign(self, inode: int, label: str) -> int:
        """The id of the netns with this inode, assigning one if new."""
        with self._lock:
            for netns_id, entry in self._by_id.items():
                if entry["inode"] == inode:
                    if entry["label"] != label:
                        entry["label"] = label
                        self._save()
                    return netns_id
            free = next((i for i in range(1, MAX_ID + 1) if i not in self._by_id), None)
            if free is None:
                raise RuntimeError(f"more than {MAX_ID} network namespaces metered at once")
            self._by_id[free] = {"inode": inode, "label": label}
            self._save()
            return free

    def find(self, inode: int) -> int | None:
        """The id given to the netns with this inode, if any."""
        with self._lock:
            return next((i for i, entry in self._by_id.items() if entry["inode"] == inode), None)

    def release(self, netns_id: int) -> None:
        with self._lock:
            if self._by_id.pop(netns_id, None) is not None:
                self._save()

    def forget_all(self) -> None:
        """Drop every id and the file: for after the last filter carrying them is gone."""
        with self._lock:
            self._by_id.clear()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def label(self, netns_id: int) -> str:
        entry = self._by_id.get(netns_id)
        return entry["label"] if entry else f"netns#{netns_id}"


def programs_for(meter, ids: NetnsIds, netns):
    """The meter's programs as tc filters for ``netns`` (a NetnsRef): its id in the classid."""
    from .tc import Programs

    inode = netns.inode()
    if inode is None:
        from .netns import NetnsNotFound
        raise NetnsNotFound(netns)
    netns_id = ids.assign(inode, str(netns))
    return Programs(meter.ingress_fd, meter.egress_fd, classid=classid(netns_id))
