"""winnow.pipeline"""
