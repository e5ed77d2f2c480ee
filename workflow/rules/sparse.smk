rule sparse_train:
    input:
        unpack(get_train_data),
        model=get_teacher,
    output:
        model=P("sparse"),
    params:
        config=get_config_path,
        regularizer="{regularizer}",
        digest=get_params("sparse"),
    log:
        log_path("sparse/{regularizer}_seed{seed}"),
    benchmark:
        bench_path("sparse/{regularizer}_seed{seed}")
    threads: W.stage_threads(config, "sparse")
    resources:
        mem_mb=8000,
        runtime=24 * 60,
        gpu=1,
    conda:
        "../envs/detprune.yaml"
    shell:
        CMD["sparse"]
