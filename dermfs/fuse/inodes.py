"""The inode table: what the daemon knows about every inode the kernel knows.

A FUSE inode number is the backing file's ``st_ino``, so that numbers are stable across
mounts and hard links share one inode. The store's root directory is the exception: it is
:data:`pyfuse3.ROOT_INODE`, and a backing object that happens to have that number gets the
root's backing number instead (a swap, so the mapping stays one to one).

Each :class:`Node` remembers, in memory only, the plaintext name and parent inode of every
link the kernel has shown us, with the backing entry name each one has. That is enough to
find a backing path for any inode (walk the parents up to the root) and to tell a later
audit layer the plaintext path of an inode (:meth:`InodeTable.plaintext_path`). Names are
never logged.

A node stays in the table while the kernel holds lookups on it, while it is open, or while
a node below it is in the table (so that paths below it can still be built).

Everything here runs in the trio thread; nothing blocks on the backing filesystem.
"""

from __future__ import annotations

import errno
import logging
import stat
from dataclasses import dataclass, field

import pyfuse3

log = logging.getLogger(__name__)

ROOT_INODE: int = pyfuse3.ROOT_INODE

#: One link of a node: the parent's inode and the plaintext name inside it.
LinkKey = tuple[int, bytes]


@dataclass
class Node:
    """One inode known to the daemon.

    Attributes:
        inode: the FUSE inode number.
        kind: the file type bits (``stat.S_IFMT``) of the backing object.
        links: the links we know of, ``(parent inode, plaintext name)`` to backing entry
            name, oldest first; the first one is used to build the backing path.
        lookups: the kernel's lookup count.
        opens: how many open handles (and in-flight users of its content) pin the node.
        children: how many links of other nodes in the table name this node as parent.
        generation: bumped when a backing inode number is reused for a new object.
        dir_id: a directory's id, once read.
        object_id: the id xattr values are bound to (file id or directory id), once read.
    """

    inode: int
    kind: int
    links: dict[LinkKey, str] = field(default_factory=dict)
    lookups: int = 0
    opens: int = 0
    children: int = 0
    generation: int = 0
    dir_id: bytes | None = None
    object_id: bytes | None = None

    @property
    def is_dir(self) -> bool:
        """Whether the node is a directory."""
        return self.kind == stat.S_IFDIR

    def __repr__(self) -> str:
        # Plaintext names stay out of every repr, log line and exception.
        return f"<Node {self.inode} kind={self.kind:o} links={len(self.links)}>"


def _unreachable(inode: int) -> OSError:
    return FileNotFoundError(errno.ENOENT, f"inode {inode} has no known path")


class InodeTable:
    """Maps FUSE inodes to nodes; see the module docstring."""

    def __init__(self, root_backing_inode: int) -> None:
        """Start a table whose root directory has backing inode *root_backing_inode*."""
        self._root_backing = root_backing_inode
        root = Node(ROOT_INODE, stat.S_IFDIR, lookups=1)
        self._nodes: dict[int, Node] = {ROOT_INODE: root}
        self._by_link: dict[LinkKey, int] = {}
        self._generations: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._nodes)

    # -------------------------------------------------------------------------- numbers

    def fuse_inode(self, backing_inode: int) -> int:
        """Return the FUSE inode number of a backing inode number."""
        if backing_inode == self._root_backing:
            return ROOT_INODE
        if backing_inode == ROOT_INODE:
            return self._root_backing
        return backing_inode

    def get(self, inode: int) -> Node:
        """Return the node of *inode*.

        Raises:
            FileNotFoundError: the inode is not in the table (a stale inode).
        """
        node = self._nodes.get(inode)
        if node is None:
            raise FileNotFoundError(errno.ENOENT, f"inode {inode} is not known")
        return node

    def find(self, inode: int) -> Node | None:
        """Return the node of *inode*, or ``None``."""
        return self._nodes.get(inode)

    # -------------------------------------------------------------------------- paths

    def backing_path(self, inode: int) -> str:
        """Return the backing path of *inode*, relative to the store (``.`` for the root).

        Raises:
            FileNotFoundError: the inode, or a directory above it, has no known link.
        """
        parts: list[str] = []
        current = self.get(inode)
        while current.inode != ROOT_INODE:
            if not current.links:
                raise _unreachable(inode)
            (parent, _name), entry = next(iter(current.links.items()))
            parts.append(entry)
            current = self.get(parent)
            if len(parts) > 4096:
                raise OSError(errno.ELOOP, "directory cycle in the inode table")
        if not parts:
            return "."
        return "/".join(reversed(parts))

    def child_path(self, parent: int, entry: str) -> str:
        """Return the backing path of *entry* inside the directory *parent*."""
        base = self.backing_path(parent)
        return entry if base == "." else f"{base}/{entry}"

    def plaintext_path(self, inode: int) -> bytes | None:
        """Return the plaintext path of *inode* inside the mount, or ``None`` if unknown.

        The path starts with ``/`` (the mount's root is ``b"/"``). For a file with several
        hard links, the oldest known link is used. An unlinked file has no path.
        """
        parts: list[bytes] = []
        current = self._nodes.get(inode)
        while current is not None and current.inode != ROOT_INODE:
            if not current.links:
                return None
            parent, name = next(iter(current.links))
            parts.append(name)
            current = self._nodes.get(parent)
            if len(parts) > 4096:
                return None
        if current is None:
            return None
        return b"/" + b"/".join(reversed(parts))

    def parent_of(self, inode: int) -> int:
        """Return the parent inode of a directory (the root is its own parent)."""
        node = self.get(inode)
        if node.inode == ROOT_INODE:
            return ROOT_INODE
        if not node.links:
            raise _unreachable(inode)
        return next(iter(node.links))[0]

    # -------------------------------------------------------------------------- lookups

    def remember(self, parent: int, name: bytes, entry: str, inode: int, kind: int) -> Node:
        """Record a link found by lookup, readdirplus or a create; count one lookup.

        If *inode* is in the table as a different object (its backing number was reused
        after the old object was removed), the node starts afresh with a new generation,
        keeping the kernel's lookup count so that later ``forget`` calls still balance.
        """
        node = self._nodes.get(inode)
        key = (parent, name)
        if node is None:
            node = Node(inode, kind, generation=self._generations.get(inode, 0))
            self._nodes[inode] = node
        elif key not in node.links:
            if (not node.links and node.opens == 0) or node.kind != kind:
                self._renew(node, kind)
            elif node.is_dir:
                # A directory has one name; the one we knew is out of date.
                for old in list(node.links):
                    self._drop_link(node, old)
        if key not in node.links:
            self._add_link(node, key, entry)
        node.lookups += 1
        return node

    def _renew(self, node: Node, kind: int) -> None:
        for key in list(node.links):
            self._drop_link(node, key)
        generation = self._generations.get(node.inode, 0) + 1
        self._generations[node.inode] = generation
        node.generation = generation
        node.kind = kind
        node.dir_id = None
        node.object_id = None
        log.debug("inode %d: backing inode reused, generation %d", node.inode, generation)

    def forget(self, inode: int, count: int) -> None:
        """Drop *count* kernel lookups of *inode*; never raises."""
        node = self._nodes.get(inode)
        if node is None or node.inode == ROOT_INODE:
            return
        node.lookups = max(0, node.lookups - count)
        self._maybe_drop(node)

    def pin(self, inode: int) -> Node:
        """Keep *inode* in the table while it is open (or being worked on)."""
        node = self.get(inode)
        node.opens += 1
        return node

    def unpin(self, inode: int) -> None:
        """Undo one :meth:`pin`."""
        node = self._nodes.get(inode)
        if node is None:
            return
        node.opens = max(0, node.opens - 1)
        self._maybe_drop(node)

    # -------------------------------------------------------------------------- changes

    def add_link(self, parent: int, name: bytes, entry: str, inode: int) -> None:
        """Record a new hard link of a node that is in the table."""
        node = self.get(inode)
        key = (parent, name)
        if key not in node.links:
            self._add_link(node, key, entry)

    def remove_link(self, parent: int, name: bytes) -> None:
        """Forget the link *name* in *parent*, whichever node has it."""
        node = self.node_at(parent, name)
        if node is not None:
            self._drop_link(node, (parent, name))
            self._maybe_drop(node)

    def node_at(self, parent: int, name: bytes) -> Node | None:
        """Return the node that has the link *name* in *parent*, if it is in the table."""
        inode = self._by_link.get((parent, name))
        return None if inode is None else self._nodes.get(inode)

    def move_link(
        self, parent: int, name: bytes, new_parent: int, new_name: bytes, new_entry: str
    ) -> None:
        """Record a rename of the link *name* in *parent*; a link at the target is dropped."""
        self.remove_link(new_parent, new_name)
        node = self.node_at(parent, name)
        if node is None:
            return
        self._drop_link(node, (parent, name))
        self._add_link(node, (new_parent, new_name), new_entry)

    def exchange_links(self, parent: int, name: bytes, new_parent: int, new_name: bytes) -> None:
        """Record a RENAME_EXCHANGE: the two links swap the nodes they point to."""
        first = self.node_at(parent, name)
        second = self.node_at(new_parent, new_name)
        first_entry = first.links[(parent, name)] if first is not None else None
        second_entry = second.links[(new_parent, new_name)] if second is not None else None
        if first is not None:
            self._drop_link(first, (parent, name))
        if second is not None:
            self._drop_link(second, (new_parent, new_name))
        if first is not None and second_entry is not None:
            self._add_link(first, (new_parent, new_name), second_entry)
        elif first is not None:
            self._maybe_drop(first)
        if second is not None and first_entry is not None:
            self._add_link(second, (parent, name), first_entry)
        elif second is not None:
            self._maybe_drop(second)

    # -------------------------------------------------------------------------- bookkeeping

    def _add_link(self, node: Node, key: LinkKey, entry: str) -> None:
        other = self.node_at(*key)
        if other is not None and other is not node:
            # The name now stands for another object; the old node lost it.
            self._drop_link(other, key)
            self._maybe_drop(other)
        node.links[key] = entry
        self._by_link[key] = node.inode
        parent = self._nodes.get(key[0])
        if parent is not None:
            parent.children += 1

    def _drop_link(self, node: Node, key: LinkKey) -> None:
        if node.links.pop(key, None) is None:
            return
        if self._by_link.get(key) == node.inode:
            del self._by_link[key]
        parent = self._nodes.get(key[0])
        if parent is not None:
            parent.children -= 1
            self._maybe_drop(parent)

    def _maybe_drop(self, node: Node) -> None:
        if node.inode == ROOT_INODE or node.lookups or node.opens or node.children:
            return
        if self._nodes.get(node.inode) is not node:
            return
        del self._nodes[node.inode]
        for key in list(node.links):
            self._drop_link(node, key)
