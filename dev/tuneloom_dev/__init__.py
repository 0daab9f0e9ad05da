"""tuneloom's development and test infrastructure (the `tuneloom-dev` distribution in dev/): local
servers started on 127.0.0.1, the local cluster and its pod runner, the tiny test model and the CRD
writer. The product never imports it; it adds `tuneloom dev` through an entry point."""
