"""Checkpoint and restore of a process tree: every process under a root (a
container's init or a host pid), all its threads, zombies, sessions, groups.

    api.py        in-process entry points: checkpointed(), checkpoint(), restore()
    worker.py     ``python -m ckptd.engine.worker``: the daemon's JSON protocol
    dump.py       DumpSession: freeze -> seize -> check/collect -> write -> resume|kill
    restore.py    read/validate -> stub -> layout -> pages -> finish -> registers
    inject.py     syscalls inside a stopped task: single-step, and the batch runner
    tree.py       the tree: parents, groups, sessions, zombies; what processes may not share
    leaks.py      what the tree shares with processes outside it, and accepting it by name
    one module per resource, each with dump_x / restore_x:
    memory.py     VMAs, pages, vdso, mm fields (PR_SET_MM_MAP)
    regs.py       registers, xstate, syscall restart fixups
    files.py      fds (files, dirs, devices, deleted files), cwd, root
    threads.py    per-thread state; recreating threads with their tids (clone3)
    signals.py    handlers, altstack, pending signals
    timers.py     itimers, POSIX timers with ids
    rlimits.py    resource limits (set from inside)
    identity.py   comm, personality, umask, sched, session, rseq, robust list ...
    creds.py      uids, gids, groups, capabilities, securebits
    seccomp.py    seccomp filters (installed last)
"""
