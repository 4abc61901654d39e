"""`make bench`: neuronserve measured side by side with the in-process ceiling and the original design.

    __main__         the run: models, ceiling, both served systems, the table
    models           random-init BERT-base and tiny, compiled with neuronserve's compile
    ceiling          the traced model called directly, one pinned process per core group
    baseline_server  a faithful reimplementation of the original sample's FastAPI + hypercorn server
    systems          neuronserve (Stack behind nginx) and the baseline, behind one interface
    wrk              closed-loop load with wrk and a generated Lua script
    cpu              CPU seconds of process trees, from /proc
    report           the ratios, the targets, markdown and JSON
"""
