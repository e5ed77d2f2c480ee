REPORT = W.report_outputs(config)


rule make_report:
    input:
        metrics=W.metrics_files(config),
        summaries=W.summary_files(config),
    output:
        csv=REPORT["csv"],
        md=report(REPORT["md"], category="Tables", caption="../report/table.rst"),
        tex=REPORT["tex"],
        summary=REPORT["summary"],
        map_vs_flops=report(
            REPORT["map_vs_flops"], category="Figures", caption="../report/map_vs_flops.rst"
        ),
        channels=report(
            REPORT["channels"], category="Figures", caption="../report/channels.rst"
        ),
    params:
        config=CONFIG_PATH,
        tables_dir=out_dir("csv"),
        figures_dir=out_dir("map_vs_flops"),
        digest=get_params("report"),
    log:
        log_path("report"),
    benchmark:
        bench_path("report")
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
        gpu=0,
    conda:
        "../envs/detprune.yaml"
    shell:
        W.COMMANDS["report"]
