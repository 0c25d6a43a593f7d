"""The FUSE frontend: a dermfs volume mounted through pyfuse3.

Modules, by concern: :mod:`~dermfs.fuse.inodes` (the inode table),
:mod:`~dermfs.fuse.handles` (open files and directories), :mod:`~dermfs.fuse.attributes`
(plaintext ``stat`` and ``statfs``), :mod:`~dermfs.fuse.xattrs`,
:mod:`~dermfs.fuse.backing` (multi-step changes to the backing store),
:mod:`~dermfs.fuse.operations` (the request handlers and the one error boundary),
:mod:`~dermfs.fuse.options` (mount options), :mod:`~dermfs.fuse.daemon` (forking,
readiness, systemd) and :mod:`~dermfs.fuse.mount` (``dermfs mount`` and ``umount``).
"""
