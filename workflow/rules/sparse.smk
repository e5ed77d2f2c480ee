rule sparse_train:
    input:
        unpack(get_train_data),
        model=P("baseline"),
    output:
        model=W.PATHS["sparse"].format(results=config["results"], regularizer="{regularizer}"),
    params:
        config=CONFIG_PATH,
        regularizer="{regularizer}",
        digest=get_params("sparse"),
    log:
        log_path("sparse/{regularizer}"),
    benchmark:
        bench_path("sparse/{regularizer}")
    wildcard_constraints:
        regularizer=r"[a-z][a-z0-9_]*",
    threads: THREADS
    resources:
        mem_mb=8000,
        runtime=24 * 60,
        gpu=1,
    conda:
        "../envs/detprune.yaml"
    shell:
        W.COMMANDS["sparse"]
