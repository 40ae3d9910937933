"""kiln.codegen"""
