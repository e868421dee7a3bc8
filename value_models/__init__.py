"""Value models for VAS: checkpoint format, trunks, heads, training and evaluation tools."""
