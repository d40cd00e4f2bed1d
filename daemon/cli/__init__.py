"""`berth`, the command-line client (like containerd's ctr): one module per verb, and the
few modules they share.

    main        the entry point: global options, the verb table (verb and aliases -> its
                module, imported only when that verb runs), error handling, exit codes
    session     the connection to berthd (Session) and CliError
    subverbs    SubVerbs: a verb's table of sub-verb name and aliases -> function, and
                its sub-parsers, built only for the sub-verb being run
    output      tables, JSON, times, sizes and the --format option
    io          the IO of attached runs: FIFOs, copy threads (splice where it is safe),
                raw terminal, forwarded signals (run, tasks start, tasks exec)

    version, namespaces, containers, tasks, events, run, images, content, snapshots,
    leases, gc: one verb each, every one with add_arguments(parser, wanted) and
    run(session, args); containers also has the creation of a container that run shares

Trio-free and import-light (every start pays for what it imports, so a verb imports only
what it uses, and main imports no verb until it knows which one runs): may import the wire
kernel (berth.shim.wire) and berth.daemon's pure leaves (config, filters, paging, oci,
reference), never trio, nor anything of berthd.
"""
