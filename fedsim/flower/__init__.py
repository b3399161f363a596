"""The Flower bridge: a client/server scenario as a Flower ServerApp (fedsim's protocol with its jobs on Flower
nodes, `server`, `runtime`) and ClientApp (the client rule on the node's own client, `client`), pytrees as Flower
records (`records`), an app directory for `flwr run` (`app`), and both sides in one process (`local`)."""
