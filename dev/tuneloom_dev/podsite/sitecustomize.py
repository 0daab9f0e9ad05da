"""Run at the start of every Python process in a pod runner Pod (PYTHONPATH names this folder)."""

from tuneloom_dev import podaddress, servicedns

servicedns.install()
podaddress.install()
