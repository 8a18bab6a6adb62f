"""`make chaos`: the real programs through a real Mosquitto while their parts fail on a
seeded schedule, then a pixel-for-pixel verdict on every image (docs/chaos.md).

    plan.py        the seeded schedule: faults (kind, target, hold) and scans
    stack.py       Mosquitto, server-ingest, two edge-agents, the OMERO stand-in process
    disks.py       the small real filesystems the disk faults fill
    standin.py     the OMERO stand-in process and its control API
    faults.py      what each fault kind does and how it is healed
    microscope.py  the acquisition client of each device (the agent's HTTP API)
    timeline.py    the run's own log
    observe.py     a witness of acks and status on the broker
    locate.py      where a tile can be on its way (spool, staging, archive)
    verify.py      each tile's fate, pixel for pixel, in the archive and in OMERO
    runner.py      one run: start, scan under faults, drain, freeze, verify
X
"""
