"""The ROS 2 layer: everything that imports rclpy or the generated nanovlm interfaces."""
