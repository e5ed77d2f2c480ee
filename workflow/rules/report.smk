if TABLES is None:
    REPORT = W.report_outputs(config)

    rule make_report:
        input:
            metrics=W.metrics_files(config),
            latency=W.latency_files(config),
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
            config=get_config_path,
            tables_dir=out_dir("csv"),
            figures_dir=out_dir("map_vs_flops"),
            digest=get_params("report"),
        log:
            W.path("log", config, stage="report"),
        benchmark:
            W.path("benchmark", config, stage="report")
        threads: 1
        resources:
            mem_mb=2000,
            runtime=10,
            gpu=0,
        conda:
            "../envs/detprune.yaml"
        shell:
            CMD["report"]


if TABLES is not None:
    TABLE_OUT = W.table_outputs(config, "{table}", "{profile}")

    rule paper_table:
        input:
            metrics=get_table_metrics,
            reported=E.REPORTED,
            spec=str(E.TABLES_DIR / "{table}.yaml"),
        output:
            csv=TABLE_OUT["csv"],
            md=report(TABLE_OUT["md"], category="{table}", caption="../report/paper_table.rst"),
            tex=TABLE_OUT["tex"],
            json=TABLE_OUT["json"],
            figure=report(
                TABLE_OUT["figure"], category="{table}", caption="../report/paper_figure.rst"
            ),
        params:
            results=get_results_root,
            seeds=get_seeds,
            tables_dir=out_dir("csv"),
            figures_dir=out_dir("figure"),
        log:
            f"{config['results']}/logs/tables/{{profile}}/{{table}}.log",
        benchmark:
            f"{config['results']}/benchmarks/tables/{{profile}}/{{table}}.tsv"
        wildcard_constraints:
            table="|".join(TABLE_SPECS),
            profile=r"mini|paper",
        threads: 1
        resources:
            mem_mb=2000,
            runtime=10,
            gpu=0,
        conda:
            "../envs/detprune.yaml"
        shell:
            CMD["table"]

    CLAIMS_OUT = W.claims_outputs(config, "{profile}")

    rule claims_ledger:
        input:
            metrics=get_claims_metrics,
            claims=E.CLAIMS,
            reported=E.REPORTED,
            specs=[str(E.TABLES_DIR / f"{name}.yaml") for name in E.table_names()],
        output:
            csv=CLAIMS_OUT["csv"],
            md=report(CLAIMS_OUT["md"], category="claims", caption="../report/claims.rst"),
        params:
            results=get_results_root,
            tables=get_claims_tables,
        log:
            f"{config['results']}/logs/tables/{{profile}}/claims.log",
        benchmark:
            f"{config['results']}/benchmarks/tables/{{profile}}/claims.tsv"
        wildcard_constraints:
            profile=r"mini|paper",
        threads: 1
        resources:
            mem_mb=2000,
            runtime=10,
            gpu=0,
        conda:
            "../envs/detprune.yaml"
        shell:
            CMD["claims"]
