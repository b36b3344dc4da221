"""winnow.flows"""
