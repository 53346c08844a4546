"""``/v1/batches``: many generation jobs submitted, followed and canceled as one."""
