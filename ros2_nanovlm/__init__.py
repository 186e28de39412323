"""nanovlm: a ROS 2 node that answers questions about camera frames with a VLM."""
