"""Domain logic of the service; routers stay thin and call these."""
