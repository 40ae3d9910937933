"""kiln.codegen.targets"""
