"""The embedded local engine: overlayfs layers and bubblewrap namespaces, rootless or as root.

- :mod:`.host`     machine checks, the shared user namespace, the kernel view, bwrap and mounts
- :mod:`.bases`    base layers: registry images, mmdebstrap, rootfs trees, the host's system dirs
- :mod:`.pool`     the warm pool of pre-started sandboxes, and spares made ahead of need
- :mod:`.cgroups`  a cgroup per sandbox (v1 or v2): memory, pids, cpu limits, the freezer
- :mod:`.limits`   rlimits where no cgroup can be had (rootless), through prlimit
- :mod:`.safefs`   host-side file access inside a running sandbox that cannot lead out of it
- :mod:`.layers`   copying, merging and squashing overlay layers
- :mod:`.unpack`   registry layer tarballs into overlay layers (whiteouts, owners)
- :mod:`.fetch`    layer blobs downloaded, verified and unpacked at once, once per digest
- :mod:`.share`    snapshots as OCI images: push, pull, export and import archives
- :mod:`.ids`      where sandbox ids land on the host, and host writes made as sandbox root
- :mod:`.seccomp`  the system call filter; :mod:`.spawn` the filtered process spawner
- :mod:`.pause`    stopping every process of a sandbox while it is copied

The :class:`~pytest_sandbox.backends.local.LocalBackend` puts these together behind the protocol.
"""
